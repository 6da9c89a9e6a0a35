"""Study 00: an MPI engine pool and one short training run (the notebook does the pool; this is the rest)."""
from __future__ import annotations

from .base import Study


class QuickstartStudy(Study):
    notebook = "00_quickstart"
    title = "Quickstart: an MPI engine pool and one short training run"
    PARAMS = {
        "smoke": dict(epochs=1, limit_train=480, limit_test=200),
        "quick": dict(epochs=1, limit_train=2400, limit_test=1000),
        "paper": dict(epochs=1, limit_train=None, limit_test=None),
    }

    def run_config(self):
        return self.config("quickstart", np=2)

    def figures(self, summary, tabs: dict) -> dict:
        import os

        from .. import figures, results

        rk = results.load_rank_epochs(summary["run_dir"])
        return {"quickstart_rank_log": figures.fig_rank_epoch_log(rk, summary["world"],
                                                                  run_id=os.path.basename(summary["run_dir"]))}

    def interpret(self, summary, tabs: dict) -> str:
        from .. import results

        rk = results.load_rank_epochs(summary["run_dir"])
        return (f"{summary['world']} ranks trained {int(rk.samples.sum())} images in {summary['global_wall_s']:.1f} s; "
                f"the averaged model scores {100 * summary['test_acc']:.1f}% on {self.p['limit_test'] or 10000} "
                f"test images." + self.ctx.title_note())
