"""Study 04: choose a configuration that trains at np = 48 without looking at the test set.

1. Every candidate trains on the training set minus a held-out validation split (the last
   ``val_split`` images, excluded from every shard) with the selection seeds.
2. ``choose`` picks the winner from validation accuracy alone, by a rule written here.
3. Only the winner is then trained on the full training set (the paper's protocol) with fresh
   seeds, and those runs are the ones reported on the test set.
"""
from __future__ import annotations

import math

from ..experiments import Planned
from ..profiles import SELECTION_CANDIDATES, processes_for, strategy_of
from .base import Study

ALL = list(SELECTION_CANDIDATES)


def choose(val_table) -> str:
    """The rule: the highest mean validation accuracy over the selection seeds; a tie goes to fewer
    runs at chance, then to the smaller spread, then to the earlier candidate in the list."""
    order = {k: i for i, k in enumerate(SELECTION_CANDIDATES)}

    def key(r):
        spread = 0.0 if math.isnan(r.val_acc_pct_std) else r.val_acc_pct_std  # one seed: no spread
        return -r.val_acc_pct_mean, r.at_chance, spread, order.get(r.candidate, len(order))

    return min(val_table.itertuples(), key=key).candidate


def candidate_of(cfg: dict) -> str | None:
    """Which candidate a run's config (field -> value) is."""
    return strategy_of(cfg, SELECTION_CANDIDATES, SELECTION_CANDIDATES)


class SelectionStudy(Study):
    notebook = "04_selection"
    title = "Choosing a configuration for np = 48 on validation data"
    PARAMS = {
        "smoke": dict(np=4, candidates=["epoch-average (paper)", ALL[-1]], select_seeds=[0], test_seeds=[1], epochs=1,
                      limit_train=480, val_split=96, limit_test=200, max_processes=2),
        "quick": dict(np=48, candidates=ALL, select_seeds=[0], test_seeds=[1], epochs=2, limit_train=8000,
                      val_split=1600, limit_test=1000, max_processes=2, checkpoint=False),
        "paper": dict(np=48, candidates=ALL, select_seeds=[0, 1, 2], test_seeds=[3, 4, 5], epochs=10,
                      limit_train=None, val_split=5000, limit_test=None, max_processes=2),
    }

    def _planned(self, name: str, seed: int, val_split: int) -> Planned:
        n = self.p["np"]
        cfg = self.config("selection", np=n, seed=seed, val_split=val_split, **SELECTION_CANDIDATES[name])
        return Planned(cfg, processes_for(n, self.p["max_processes"]))

    def plan(self) -> list[Planned]:
        """The selection runs: every candidate, every selection seed, validation split held out."""
        return [self._planned(k, s, self.p["val_split"]) for k in self.p["candidates"] for s in self.p["select_seeds"]]

    def test_plan(self, winner: str) -> list[Planned]:
        """The report runs: the winner alone, fresh seeds, the full training set, the test set."""
        overlap = set(self.p["test_seeds"]) & set(self.p["select_seeds"])
        if overlap:
            raise ValueError(f"test seeds {sorted(overlap)} were used for selection; report on fresh seeds")
        return [self._planned(winner, s, 0) for s in self.p["test_seeds"]]

    def planned(self) -> list[Planned]:
        """The selection runs and the test runs of the winner: chosen by the rule when every selection run
        is stored (so a second main job counts no run it will not train), else, as an estimate, of the
        recommended candidate."""
        from ..experiments import stored
        from ..profiles import RECOMMENDED

        dirs, missing = stored(self.plan(), desc=None)
        if not missing:
            winner = choose(self.val_table(self.ctx.load(dirs)))
        else:
            winner = RECOMMENDED if RECOMMENDED in self.p["candidates"] else self.p["candidates"][0]
        return self.plan() + self.test_plan(winner)

    def collect(self):
        """(selection runs, winner, test runs): the test runs are planned only after the choice."""
        sel = self.ctx.ensure(self.plan(), "selection (validation)")
        if sel.empty:
            return sel, None, sel
        winner = choose(self.val_table(sel))
        test = self.ctx.ensure(self.test_plan(winner), f"winner on the test set ({winner})")
        return sel, winner, test

    # -------------------------------------------------------------- tables
    @staticmethod
    def _with_candidate(runs):
        cfgs = [{k[4:]: v for k, v in r.items() if k.startswith("cfg_")} for _, r in runs.iterrows()]
        return runs.assign(candidate=[candidate_of(c) for c in cfgs])

    @staticmethod
    def _per_candidate(r, ev: str):
        """Per candidate: <ev> accuracy and loss (mean ± std over seeds), runs at chance, one column per seed."""
        from .. import metrics

        r = r.assign(**{f"{ev}_acc_pct": 100 * r[f"{ev}_acc"]})
        t = metrics.aggregate(r, "candidate", [f"{ev}_acc_pct", f"{ev}_loss"])
        t = t.merge(r.groupby("candidate").agg(at_chance=("at_chance", "sum"), collapsed=("collapsed", "sum"))
                    .reset_index(), on="candidate")
        seeds = r.pivot_table(index="candidate", columns="cfg_seed", values=f"{ev}_acc_pct")
        seeds.columns = [f"{ev}_acc_pct_seed{int(c)}" for c in seeds.columns]
        t = t.merge(seeds.reset_index(), on="candidate")
        t.attrs["run_ids"] = sorted(r["run_id"])
        return t

    def val_table(self, sel):
        """Every candidate on validation data, the rule's choice marked."""
        t = self._per_candidate(self._with_candidate(sel), "val")
        t["chosen"] = t["candidate"] == choose(t)
        out = t.sort_values("val_acc_pct_mean", ascending=False).reset_index(drop=True)
        out.attrs = dict(t.attrs)
        return out

    def test_table(self, test, winner):
        """The winner on the test set, fresh seeds."""
        return self._per_candidate(test.assign(candidate=winner), "test").assign(np=self.p["np"])

    def tables(self, collected) -> dict:
        sel, winner, test = collected
        out = {}
        if len(sel):
            out["table_selection_validation"] = self.val_table(sel)
        if winner is not None and len(test):
            out["table_selection_test"] = self.test_table(test, winner)
        return out

    def figures(self, collected, tabs: dict) -> dict:
        from .. import figures

        if "table_selection_validation" not in tabs:
            return {}
        return {"fig_selection": figures.fig_selection(tabs["table_selection_validation"], tabs.get("table_selection_test"),
                                                       self.p["np"])}

    def interpret(self, collected, tables: dict) -> str:
        sel, winner, test = collected
        if winner is None:
            return "No selection run is in the results store yet."
        v = tables["table_selection_validation"]
        w = v[v.candidate == winner].iloc[0]
        n = len(self.p["select_seeds"])
        text = (f"On validation data ({self.p['val_split']} held-out training images, {n} seed(s) per candidate), "
                f"the rule picks **{winner}**: {w.val_acc_pct_mean:.2f}% mean validation accuracy at np={self.p['np']} "
                f"({int(w.at_chance)} of {int(w.n_runs)} runs at chance). ")
        if "table_selection_test" in tables:
            t = tables["table_selection_test"].iloc[0]
            std = "" if t.test_acc_pct_std != t.test_acc_pct_std else f" ± {t.test_acc_pct_std:.2f}"
            text += (f"Trained on the full training set with fresh seeds {self.p['test_seeds']}, it scores "
                     f"{t.test_acc_pct_mean:.2f}%{std} test accuracy ({int(t.n_runs)} runs, {int(t.at_chance)} at chance).")
        else:
            text += "Its test runs are not in the store yet."
        return text + self.ctx.title_note()
