"""Study 01: the paper's batch-size sweep (Table 1, Figures 4-5).

Batch per node in {8, 16, 24, 32}, two ranks on one node, a fixed number of steps per epoch (the
paper's Table 1 implies 200: average epoch time / mean step = 200). Every run is timed: a record whose
wall time is a cluster's (one process per rank, no more processes than cores, no other load) is
preferred; a run timed beside other load is kept and shown as "not a cluster time" (hollow points),
and only `retime` runs it again.
"""
from __future__ import annotations

from ..experiments import Planned
from ..profiles import PAPER_BATCHES, SWEEP_STEPS
from .base import Study


class BatchSweepStudy(Study):
    notebook = "01_batch_sweep"
    title = "Batch-size sweep (the paper's Table 1, Figures 4-5)"
    PARAMS = {
        "smoke": dict(batches=PAPER_BATCHES, steps_per_epoch=10, epochs=2, limit_test=200, seeds=[0]),
        "quick": dict(batches=PAPER_BATCHES, steps_per_epoch=SWEEP_STEPS, epochs=2, limit_test=1000, seeds=[0]),
        # The paper repeated every configuration three times.
        "paper": dict(batches=PAPER_BATCHES, steps_per_epoch=SWEEP_STEPS, epochs=3, limit_test=None, seeds=[0, 1, 2]),
    }

    def plan(self) -> list[Planned]:
        p = self.p
        return [Planned(self.config("batch-sweep", np=2, batch_per_node=b, ranks_per_node=2, epochs=p["epochs"],
                                    limit_train=p["steps_per_epoch"] * b, limit_test=p["limit_test"],
                                    diagnostics=False, seed=s), 2, timed=True)
                for b in p["batches"] for s in p["seeds"]]

    def tables(self, runs) -> dict:
        """Table 1 (cluster-valid timings where a row has them, else every run, labelled) and every run."""
        from .. import tables

        if runs.empty:
            return {}
        rk = tables.load_rank_epochs_by_run(runs)
        return {"table1_batch_sweep": tables.table1_batch_sweep(runs, rk),
                "table1_batch_sweep_runs": tables.table1_per_run(runs, rk)}

    def figures(self, runs, tabs: dict) -> dict:
        from .. import figures

        if "table1_batch_sweep" not in tabs:
            return {}
        return {"fig04_05_batch_sweep": figures.fig_batch_sweep(tabs["table1_batch_sweep"],
                                                                steps_per_epoch=self.p["steps_per_epoch"])}

    def interpret(self, runs, tabs: dict) -> str:
        from ..records import CLUSTER

        if "table1_batch_sweep" not in tabs:
            return "No batch-sweep run is in the results store yet." + self.ctx.title_note()
        t1 = tabs["table1_batch_sweep"]
        best = t1.loc[t1.global_img_per_s_mean.idxmax()]
        n = f"{t1.n_runs.min()}" if t1.n_runs.nunique() == 1 else f"{t1.n_runs.min()}-{t1.n_runs.max()}"
        other = t1[t1.wall_time_kind != CLUSTER]
        timing = "" if other.empty else (
            f"Rows at batch {', '.join(str(int(b)) for b in other.batch_per_node)}/node are present but not "
            f"cluster-valid ({'; '.join(sorted({k.split(': ', 1)[-1] for ks in other.wall_time_kind for k in ks.split('; ')}))}): "
            "their times are drawn hollow and are not a benchmark (`labtools reproduce --retime` runs them again). ")
        return (timing + f"Each row pools {n} run(s). On this machine the highest global throughput (batch/node over the mean "
                f"step, the paper's definition) is at batch {int(best.batch_per_node)}/node "
                f"({best.global_img_per_s_mean:.0f} img/s); the paper found its optimum at 24/node on a Raspberry Pi 4. "
                f"Peak RSS per process over the whole run ranges {t1.peak_rss_mb_mean.min():.0f}-"
                f"{t1.peak_rss_mb_mean.max():.0f} MB (TensorFlow itself is most of it)." + self.ctx.title_note())
