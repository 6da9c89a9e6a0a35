"""Study 02: the paper's strong scaling (Table 2, Figures 6-12).

np in {2, 4, ..., 48}, 10 epochs, batch 12 per rank, Adam 5e-4, the paper's once-per-epoch weight
average, three seeds per np as the paper repeated each configuration. Where np exceeds the
processes this machine can host, logical ranks compute the same numbers on fewer processes; such
a run's wall time is not a cluster's, and only cluster-valid times enter speedup and efficiency.
"""
from __future__ import annotations

import os

from ..experiments import Planned
from ..profiles import PAPER_NPS, processes_for
from .base import Study


class StrongScalingStudy(Study):
    notebook = "02_strong_scaling"
    title = "Strong scaling (the paper's Table 2, Figures 6-12)"
    # max_processes None: as many as this host has cores (a cluster profile may allow more).
    PARAMS = {
        "smoke": dict(nps=[2, 4], epochs=2, limit_train=480, limit_test=200, seeds=[0], max_processes=2),
        "quick": dict(nps=PAPER_NPS, epochs=2, limit_train=8000, limit_test=1000, seeds=[0], max_processes=None,
                      checkpoint=False),
        "paper": dict(nps=PAPER_NPS, epochs=10, limit_train=None, limit_test=None, seeds=[0, 1, 2], max_processes=None),
    }

    def max_processes(self) -> int:
        return self.p["max_processes"] or os.cpu_count() or 1

    def plan(self) -> list[Planned]:
        """Each np and seed once; a run with one process per rank is timed (needs a cluster-valid record)."""
        out = []
        for n in self.p["nps"]:
            procs = processes_for(n, self.max_processes())
            for s in self.p["seeds"]:
                out.append(Planned(self.config("scaling", np=n, seed=s), procs, timed=procs == n))
        return out

    def tables(self, runs) -> dict:
        from .. import tables

        if runs.empty:
            return {}
        return {"table2_strong_scaling": tables.table2_scaling(runs, base_np=min(self.p["nps"])),
                "table2_strong_scaling_runs": tables.table2_per_run(runs)}

    def figures(self, runs, tabs: dict) -> dict:
        from .. import figures, results

        if "table2_strong_scaling" not in tabs:
            return {}
        t2, per_run = tabs["table2_strong_scaling"], tabs["table2_strong_scaling_runs"]
        out = {}
        for n, name in ((2, "fig06_rank_log_np2"), (4, "fig07_rank_log_np4")):
            sel = runs[runs.world == n].sort_values("cfg_seed")
            if len(sel):
                r = sel.iloc[0]
                out[name] = figures.fig_rank_epoch_log(results.load_rank_epochs(r.run_dir), n, run_id=r.run_id)
        for fn, name in ((figures.fig_speedup, "fig08_speedup"), (figures.fig_efficiency, "fig09_efficiency"),
                         (figures.fig_train_accuracy, "fig10_train_accuracy"), (figures.fig_total_time, "fig11_total_time"),
                         (figures.fig_train_loss, "fig12_train_loss"), (figures.fig_test_accuracy, "fig_test_accuracy")):
            out[name] = fn(t2, per_run)
        return out

    def interpret(self, runs, tabs: dict) -> str:
        if "table2_strong_scaling" not in tabs:
            return "No strong-scaling run is in the results store yet." + self.ctx.title_note()
        t2 = tabs["table2_strong_scaling"]
        first, last = t2.iloc[0], t2.iloc[-1]

        def acc(r):
            sd = "" if r.test_acc_pct_std != r.test_acc_pct_std else f" ± {r.test_acc_pct_std:.1f}"
            return f"{r.test_acc_pct_mean:.1f}%{sd} (n={int(r.n_runs)})"

        lines = [f"Test accuracy goes from {acc(first)} at np={int(first.np)} to {acc(last)} at np={int(last.np)}."]
        n_runs, n_coll, n_chance = int(t2.n_runs.sum()), int(t2.collapsed.sum()), int(t2.at_chance.sum())
        if n_chance:
            where = ", ".join(f"np={int(r.np)}: {int(r.at_chance)}/{int(r.n_runs)}" for r in t2[t2.at_chance > 0].itertuples())
            lines.append(f"{n_chance} of {n_runs} runs ended at chance ({where}); {n_coll} of them exactly at "
                         f"ln 10. Collapse here is a per-seed event, not a threshold in np.")
        else:
            lines.append(f"None of the {n_runs} runs ended at chance (and none collapsed exactly to ln 10).")
        timed = t2[t2.n_timed > 0]
        reasons = sorted({k.split(": ", 1)[-1] for kinds in t2[t2.n_timed == 0].wall_time_kind for k in kinds.split("; ")})
        lines.append(f"{len(timed)} of {len(t2)} rows have cluster-valid wall times (np "
                     + (", ".join(str(int(n)) for n in timed.np) or "none") + ")"
                     + (f"; the others have no speedup or efficiency here ({'; '.join(reasons)})." if reasons else "."))
        return " ".join(lines) + self.ctx.title_note()
