"""Study 03: sync strategies that do not collapse, and the collapse explained.

Part 1 asks how often the paper's own configuration collapses at np = 1 and 2 across seeds, per
input preprocessing and model option. Part 2 trains every np with each sync strategy at the
paper's budget and compares test accuracy, the paper's values overlaid, with diagnostics.
"""
from __future__ import annotations

from ..experiments import Planned
from ..profiles import TUNED_ALLREDUCE, COLLAPSE_VARIANTS, PAPER_NPS, STRATEGIES, processes_for, strategy_of
from .base import Study

PAPER_SYNC = "epoch-average (paper)"


def variant_of(r) -> str | None:
    """Which collapse option set a run (a row of load_runs, as a namedtuple) is."""
    for k, v in COLLAPSE_VARIANTS.items():
        if (all(getattr(r, f"cfg_{f}") == x for f, x in v.items())
                and r.cfg_final_relu == v.get("final_relu", True) and r.cfg_conv10_init == v.get("conv10_init", "keras")):
            return k
    return None


class SyncStrategiesStudy(Study):
    notebook = "03_sync_strategies"
    title = "Sync strategies that do not collapse, and the collapse explained"
    PARTS = {"table_collapse_frequency": ("collapse frequency",), "fig_collapse_runs": ("collapse frequency",)}

    def parts_of(self, name: str):
        return self.PARTS.get(name, ("sync strategies",))

    PARAMS = {
        "smoke": dict(collapse_nps=[1, 2], collapse_seeds=[0], collapse_variants=["caffe", "unit"], nps=[2, 4],
                      strategies=[PAPER_SYNC, TUNED_ALLREDUCE], seeds=[0], epochs=2, limit_train=480, limit_test=200,
                      max_processes=2),
        "quick": dict(collapse_nps=[2], collapse_seeds=[0], collapse_variants=list(COLLAPSE_VARIANTS),
                      nps=[2, 8, 48], strategies=[PAPER_SYNC, "allreduce", TUNED_ALLREDUCE], seeds=[0], epochs=2,
                      limit_train=8000, limit_test=1000, max_processes=2, checkpoint=False),
        "paper": dict(collapse_nps=[1, 2], collapse_seeds=[0, 1, 2, 3, 4], collapse_variants=list(COLLAPSE_VARIANTS),
                      nps=PAPER_NPS, strategies=list(STRATEGIES), seeds=[0, 1, 2], epochs=10, limit_train=None,
                      limit_test=None, max_processes=2),
    }

    def collapse_plan(self) -> list[Planned]:
        p = self.p
        return [Planned(self.config("collapse", np=n, ranks_per_node=min(n, 2), batch_per_node=12 * min(n, 2), seed=s,
                                    **COLLAPSE_VARIANTS[v]), n)
                for n in p["collapse_nps"] for v in p["collapse_variants"] for s in p["collapse_seeds"]]

    def plan(self) -> list[Planned]:
        p = self.p
        return [Planned(self.config("sync", np=n, seed=s, **STRATEGIES[k]), processes_for(n, p["max_processes"]))
                for k in p["strategies"] for n in p["nps"] for s in p["seeds"]]

    def planned(self) -> list[Planned]:
        return self.collapse_plan() + self.plan()

    def collect(self):
        """(collapse runs, strategy runs), each with the columns the tables need."""
        from .. import results

        collapse = self.ctx.ensure(self.collapse_plan(), "collapse frequency")
        if len(collapse):
            collapse = collapse.assign(
                test_acc_pct=100 * collapse.test_acc, variant=[variant_of(r) for r in collapse.itertuples()],
                dead_below_frac=[results.load_epochs(d).dead_relu_frac.iloc[-1] for d in collapse.run_dir])
        runs = self.ctx.ensure(self.plan(), "sync strategies")
        if len(runs):
            runs["strategy"] = [strategy_of({k[4:]: v for k, v in r.items() if k.startswith("cfg_")}, self.p["strategies"])
                                for _, r in runs.iterrows()]
        return collapse, runs

    def tables(self, collected) -> dict:
        from .. import tables

        collapse, runs = collected
        out = {}
        if len(collapse):
            tc = (collapse.groupby(["world", "variant"])
                  .agg(runs=("run_id", "count"), collapsed=("collapsed", "sum"), at_chance=("at_chance", "sum"),
                       test_acc_pct_mean=("test_acc_pct", "mean"), test_acc_pct_std=("test_acc_pct", "std"),
                       dead_conv10_frac_mean=("dead_conv10_frac", "mean"), dead_below_frac_mean=("dead_below_frac", "mean"),
                       init_dead_conv10_frac_mean=("init_dead_conv10_frac", "mean"))
                  .reset_index())
            tc.attrs["run_ids"] = sorted(collapse.run_id)
            tc.attrs["notes"] = [tables.TABLE2_NOTES[1]]
            out["table_collapse_frequency"] = tc
        if len(runs):
            ts = tables.strategy_table(runs, runs["strategy"])
            out["table_sync_strategies"] = ts
            ea = runs[runs.strategy == PAPER_SYNC]
            if len(ea):
                out["table_epoch_average_vs_paper"] = tables.strategy_vs_paper(tables.strategy_table(ea, ea["strategy"]))
        return out

    def figures(self, collected, tabs: dict) -> dict:
        from .. import figures, results

        collapse, runs = collected
        out = {}
        if len(collapse):
            out["fig_collapse_runs"] = figures.fig_collapse_runs(collapse, variant_of)
        if "table_sync_strategies" in tabs:
            out["fig_sync_accuracy_vs_np"] = figures.fig_strategy_accuracy(tabs["table_sync_strategies"])
            n_max = max(self.p["nps"])
            big = runs[runs.world == n_max]
            curves = {r.run_id: (r.strategy, results.load_epochs(r.run_dir)) for r in big.itertuples()}
            if curves:
                out[f"fig_sync_accuracy_vs_epoch_np{n_max}"] = figures.fig_accuracy_vs_epoch(curves, n_max)
                out[f"fig_sync_diagnostics_np{n_max}"] = figures.fig_diagnostics(curves, n_max)
        return out

    def interpret(self, collected, tabs: dict) -> str:
        import pandas as pd

        collapse, runs = collected
        tc, ts, tp = (tabs.get(k) for k in ("table_collapse_frequency", "table_sync_strategies",
                                            "table_epoch_average_vs_paper"))
        n_max = max(self.p["nps"])
        lines = []
        if ts is not None:
            def acc(k):
                r = ts[(ts.strategy == k) & (ts.np == n_max)]
                return f"{r.test_acc_pct_mean.iloc[0]:.1f}% (n={int(r.n_runs.iloc[0])})" if len(r) else "not run"

            lines.append(f"At np={n_max}, mean test accuracy over seeds: "
                         + "; ".join(f"{k} {acc(k)}" for k in self.p["strategies"]) + ".")
        if tc is None:
            lines.append("The collapse frequency part has no runs yet.")
        else:
            n, c, a = int(tc.runs.sum()), int(tc.collapsed.sum()), int(tc.at_chance.sum())
            lines.append(f"At np = 1 and 2, {c} of {n} runs collapsed exactly to ln 10 and {a} ended at chance.")
            coll = tc[tc.at_chance > 0]
            if len(coll):
                lines.append("Runs at chance occurred for " + "; ".join(sorted(set(coll.variant)))
                             + ", so collapse does not need small shards.")
                below = collapse.groupby("collapsed").dead_below_frac.mean()
                if len(below) == 2:
                    lines.append(f"Below conv10, the collapsed runs ended with {below[True]:.2f} of their ReLU channels "
                                 f"dead, the runs that trained with {below[False]:.2f}.")
                known = collapse.dropna(subset=["init_dead_conv10_frac"])
                both = known.groupby("variant").filter(lambda g: g.collapsed.nunique() == 2)
                if len(both):  # init dead fractions differ by option (conv10 init): compare within an option
                    init = both.groupby("collapsed").init_dead_conv10_frac.mean()
                    lines.append(f"Within the options where some runs collapsed and others trained "
                                 f"({', '.join(sorted(set(both.variant)))}), the runs that collapsed started with "
                                 f"{init[True]:.2f} of their conv10 channels dead on the probe batch, those that "
                                 f"trained with {init[False]:.2f}.")
        if tp is not None:
            pct = lambda v: "not in the paper" if pd.isna(v) else f"{v:.1f}%"
            lines.append(f"`{PAPER_SYNC}` here against the paper's Table 2, mean test accuracy (at chance/runs): "
                         + "; ".join(f"np={r.np}: {r.test_acc_pct_mean:.1f}% ({r.at_chance}/{r.n_runs}) vs "
                                     f"{pct(r.paper_test_acc_pct)}" for r in tp[tp.n_runs > 0].itertuples()) + ".")
        return " ".join(lines) + self.ctx.title_note()
