"""What every notebook needs once: paths, profile parameters, a runner, loading, saving with provenance.

Notebooks stay thin: a parameters cell, ``ctx = Context(profile, "02_strong_scaling", ...)``,
a plan, ``ctx.ensure(plan)``, a table, figures, a generated sentence of interpretation.
"""
from __future__ import annotations

from pathlib import Path

from . import experiments, paths, provenance, results
from .config import RunConfig

project_root = paths.project_root  # notebooks import it from here


class Context:
    """cifar_dir: the CIFAR-10 folder (default: found as `labtools data where` finds it, once, before a
    run starts). retime: a timed plan (the batch sweep, one process per rank) reruns unless a
    cluster-timed record exists; by default any record of its science stands for it and its time is
    drawn as "not a cluster time". write_store: train into a read-only store (experiments.READ_ONLY_MARK)."""

    def __init__(self, profile: str, notebook: str, out_dir=None, results_root=None, runner: str = "pool",
                 run_missing: bool = True, params: dict | None = None, cifar_dir=None, retime: bool = False,
                 write_store: bool = False):
        # run_missing=False renders what the store holds: a long study (the paper profile of 03 is
        # ~12 h on 2 cores) can be looked at part way, and every output says how much is missing.
        self.run_missing = run_missing
        self.missing: dict[str, dict] = {}
        self.profile, self.notebook, self.runner_kind = profile, notebook, runner
        self.params = dict(params or {})
        self.cifar_dir, self.retime = (str(cifar_dir) if cifar_dir else None), retime
        self.out_dir = Path(out_dir) if out_dir else paths.figures_root() / profile
        # default: the local store `make main` computes into (ignored by git); committed records: ../results
        self.results_root = Path(results_root) if results_root else paths.local_store()
        why = experiments.read_only(self.results_root)
        self.writable = not why or write_store
        if why and run_missing and not write_store:
            print(f"The results store {self.results_root} is read-only ({why}): showing its runs, training none "
                  "(write_store=True trains into it).", flush=True)
            self.run_missing = False
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.reduced = profile != "paper"

    def experiment(self, name: str) -> str:
        return f"{name}-{self.profile}"

    def base_config(self, experiment: str, **kw) -> RunConfig:
        """The paper's protocol with this profile's reductions and this notebook's results folder."""
        p = self.params
        # checkpoint=False in a profile of short runs: a checkpoint per epoch (every logical rank's weights
        # and Adam state: 420 MB at np = 48) costs more than redoing a run of seconds
        base = dict(epochs=p.get("epochs", 10), limit_train=p.get("limit_train"), limit_test=p.get("limit_test"),
                    out=str(self.results_root), experiment=self.experiment(experiment), label=self.profile,
                    checkpoint=p.get("checkpoint", True), cifar_dir=self.cifar_dir)
        base.update(kw)
        return RunConfig(**base).validate()

    def runner(self):
        if self.runner_kind == "mpiexec":
            return _Closing(experiments.MpiexecRunner())
        return experiments.PoolRunner()

    def ensure(self, plan, desc: str, rerun: bool = False):
        """Run what the store lacks (each planned run once), return the runs as a DataFrame.
        With run_missing=False nothing is run: the runs present are returned and the gap is recorded."""
        if not self.run_missing:
            dirs, n_missing = experiments.stored(plan, desc=desc)
            if n_missing:
                self.missing[desc] = {"planned": len(plan), "missing": n_missing}
            return self.load(dirs)
        with self.runner() as run:
            dirs = experiments.ensure(plan, run, desc=desc, rerun=rerun, retime=self.retime, write_store=self.writable)
        return self.load(dirs)

    @staticmethod
    def load(dirs):
        import pandas as pd

        keep = {str(d) for d in dirs}
        roots = sorted({Path(d).parent for d in dirs})  # sorted: a set's order changes from process to process,
        frames = [results.load_runs(r.parent, r.name) for r in roots]  # and with it a std's last bits
        df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        return df[df.run_dir.isin(keep)].sort_values("run_dir").reset_index(drop=True) if len(df) else df

    def _missing(self, parts=None) -> dict:
        """The gaps of the given parts of the study (ensure's desc names), or of all of it."""
        return {k: v for k, v in self.missing.items() if parts is None or k in parts}

    def provenance(self, parts=None, **extra) -> dict:
        miss = self._missing(parts)
        return {"profile": self.profile, "reduced_protocol": self.reduced, "notebook": self.notebook,
                "profile_params": self.params, "partial": bool(miss), "runs_missing": miss,
                "results_store": self.store_from_out(), **extra}

    def store_from_out(self) -> str:
        """The results store relative to out_dir (a relative path: no machine path in a sidecar), so the
        report links each run where it is, e.g. ../../results/local/EXPERIMENT/RUN_ID/."""
        import os

        try:
            return Path(os.path.relpath(self.results_root.resolve(), self.out_dir.resolve())).as_posix()
        except ValueError:  # another drive (Windows): no relative path exists
            return self.results_root.resolve().as_posix()

    def save_table(self, df, name: str, run_ids=None, parts=None, **extra):
        from .tables import save_table

        return save_table(df, self.out_dir / "tables", name, provenance=self.provenance(parts, **extra),
                          run_ids=run_ids)

    def save_figure(self, fig, name: str, run_ids=None, parts=None, **extra):
        from .figures import save_figure

        note = self.title_note(parts)
        if note:  # a reduced or partial study says so on the figure, not only in the sidecar
            for ax in fig.axes[:1]:
                ax.set_title(ax.get_title() + "\n" + note.strip(), fontsize=ax.title.get_fontsize())
        return save_figure(fig, self.out_dir / "figures", name, provenance=self.provenance(parts, **extra),
                           run_ids=run_ids)

    def title_note(self, parts=None) -> str:
        note = "" if not self.reduced else f" [profile '{self.profile}': reduced protocol]"
        for desc, m in self._missing(parts).items():
            note += f" [partial: {m['planned'] - m['missing']} of {m['planned']} planned {desc} runs]"
        return note


class _Closing:
    def __init__(self, fn):
        self.fn = fn

    def __enter__(self):
        return self.fn

    def __exit__(self, *exc):
        return False


__all__ = ["Context", "project_root"]
