"""Study 00: an MPI engine pool and one short training run (the notebook does the pool; this is the rest)."""
from __future__ import annotations

from .base import Study


class QuickstartStudy(Study):
    notebook = "00_quickstart"
    title = "Quickstart: an MPI engine pool and one short training run"
    PARAMS = {
        "smoke": dict(epochs=1, limit_train=480, limit_test=200),
        "quick": dict(epochs=4, limit_train=15_000, limit_test=2000),
        "paper": dict(epochs=1, limit_train=None, limit_test=None),
    }

    def run_config(self):
        """The recommended configuration (notebook 04's choice), its warmup a quarter of this short run:
        it learns in a short run, where the paper's (epoch-average, Adam 5e-4) is near chance for
        some seeds after a few epochs on a subset."""
        from ..profiles import RECOMMENDED, STRATEGIES

        return self.config("quickstart", np=2, **{**STRATEGIES[RECOMMENDED], "warmup_epochs": self.p["epochs"] / 4})

    def __init__(self, *args, rerun: bool = False, **kw):
        super().__init__(*args, **kw)
        self.rerun = rerun

    def stored_run(self):
        """This demo's run when the store already holds it (a second `make main`), else None: shown
        instead of training again unless rerun=True."""
        from ..experiments import Planned, Store

        if self.rerun:
            return None
        return Store(self.ctx.results_root).find(Planned(self.run_config(), 2))

    def training_config(self):
        """run_config() ready to train, or None when the stored run is shown instead (stored_run). Checked
        here, before any engine starts: the results store is writable, and CIFAR-10 is found (missing data
        is one sentence, DataError, not a traceback from every rank)."""
        from ..experiments import Planned, read_only, with_data

        if self.stored_run() is not None:
            return None
        why = read_only(self.ctx.results_root)
        if why and not self.ctx.writable:
            raise ValueError(f"the quickstart trains, and its results store {self.ctx.results_root} is read-only ({why}); "
                             "leave results_root at its default (results/local/)")
        return with_data([Planned(self.run_config(), 2)])[0].cfg

    def train(self, pool, config) -> dict:
        """Train config on the pool; with config None, the stored run's summary (said so)."""
        import json

        if config is not None:
            return pool.run(config)
        d = self.stored_run()
        print(f"The results store already holds this run ({d.name}): shown without training again "
              "(rerun = True trains it anew).", flush=True)
        return {**json.loads((d / "summary.json").read_text()), "run_dir": str(d)}

    def planned(self):
        """The demo's one run (trained once; shown from the store after that unless rerun)."""
        from ..experiments import Planned

        return [Planned(self.run_config(), 2)]

    def figures(self, summary, tabs: dict) -> dict:
        import os

        from .. import figures, results

        rk = results.load_rank_epochs(summary["run_dir"])
        return {"quickstart_rank_log": figures.fig_rank_epoch_log(rk, summary["world"],
                                                                  run_id=os.path.basename(summary["run_dir"]))}

    @staticmethod
    def summary_frame(summary):
        """The run's headline as a one-row table: what a reader checks first."""
        import os

        import pandas as pd

        return pd.DataFrame([{
            "run": os.path.basename(summary["run_dir"]), "ranks (N)": summary["world"],
            "processes (P)": summary["processes"], "epochs": summary["epochs"],
            "test acc (%)": round(100 * summary["test_acc"], 2), "test loss": round(summary["test_loss"], 4),
            "wall (s)": round(summary["global_wall_s"], 1), "wall time": summary["wall_time_kind"]}])

    def interpret(self, summary, tabs: dict) -> str:
        import math

        from .. import results

        rk = results.load_rank_epochs(summary["run_dir"])
        acc, loss = 100 * summary["test_acc"], summary["test_loss"]
        verdict = (f"well above chance (10%; a collapsed run sits at loss ln 10 = {math.log(10):.4f})" if acc >= 20 else
                   f"near chance (10%): this seed did not learn in so short a run (loss {loss:.4f} against ln 10 = "
                   f"{math.log(10):.4f}); SqueezeNet v1.1 without batch norm collapses for some seeds, see notebook 03")
        return (f"{summary['world']} ranks trained {int(rk.samples.sum())} images in {summary['global_wall_s']:.1f} s; "
                f"the averaged model scores {acc:.1f}% on {self.p['limit_test'] or 10000} test images, {verdict}."
                + self.ctx.title_note())
