"""Studies as code: plans, reuse from the store, the selection rule; all without papermill."""
import json

import pandas as pd
import pytest

from labtools import experiments, numerics, records, results
from labtools.config import RunConfig
from labtools.experiments import Planned, Store
from labtools.studies import NOTEBOOKS, STUDIES, study
from labtools.studies.selection import SelectionStudy, choose


def _record(root, experiment, cfg, processes, kind=records.CLUSTER, version=numerics.VERSION, end="2026-01-01"):
    d = root / experiment / f"{cfg.science_key()}-p{processes}-{end}"
    results.write_json(d / "manifest.json", {
        "config": cfg.to_dict(), "world": cfg.np, "processes": processes, "wall_time_kind": kind,
        "other_cores": {}, "numerics_version": version, "end_utc": end, "status": "completed"})
    results.write_json(d / "summary.json", {"test_acc": 0.5, "test_loss": 1.0})
    return d


def test_store_reuses_by_science_across_experiments_and_p(tmp_path):
    cfg = RunConfig(np=8, seed=1, out=str(tmp_path), experiment="mine")
    other = _record(tmp_path, "someone-else", cfg.replace(experiment="someone-else"), 2, kind=records.LOGICAL)
    s = Store(tmp_path)
    assert s.find(Planned(cfg, 8)) == other  # another experiment, another P: the same numbers
    # a timed plan takes it too (its time is drawn as "not a cluster time"); only retiming runs it again
    assert s.find(Planned(cfg, 8, timed=True)) == other
    assert s.find(Planned(cfg, 8, timed=True), retime=True) is None
    timed = _record(tmp_path, "x", cfg, 8, kind=records.CLUSTER, end="2025-01-01")
    assert Store(tmp_path).find(Planned(cfg, 8, timed=True)) == timed  # a cluster time wins, though older
    assert Store(tmp_path).find(Planned(cfg, 8, timed=True), retime=True) == timed
    assert Store(tmp_path).find(Planned(cfg, 8)) == other  # the newest, when timing does not matter
    assert Store(tmp_path).find(Planned(cfg.replace(seed=2), 8)) is None


def test_store_never_reuses_stale_numerics(tmp_path):
    cfg = RunConfig(np=4, sync="allreduce", out=str(tmp_path))
    _record(tmp_path, "old", cfg, 2, version=1)
    s = Store(tmp_path)
    assert s.find(Planned(cfg, 2)) is None and s.stale_for(Planned(cfg, 2))
    assert results.load_runs(tmp_path).empty and len(results.load_runs(tmp_path, stale=True)) == 1


def test_load_runs_refuses_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results folder"):
        results.load_runs(tmp_path / "nope")


def test_every_study_plans_every_profile(tmp_path):
    for name in NOTEBOOKS:
        for profile in ("smoke", "quick", "paper"):
            st = study(name, profile, out_dir=tmp_path / "f", results_root=tmp_path / "r")
            if name == "00_quickstart":
                assert st.run_config().np == 2
                continue
            plan = st.plan()
            assert plan and all(isinstance(p, Planned) and p.cfg.np for p in plan)
            keys = [(p.cfg.science_key()) for p in plan]
            assert len(keys) == len(set(keys)), f"{name}/{profile} plans the same run twice"


def test_paper_profile_is_the_papers_protocol(tmp_path):
    kw = dict(out_dir=tmp_path / "f", results_root=tmp_path / "r")
    p2 = study("02_strong_scaling", "paper", **kw).plan()
    assert sorted({p.cfg.np for p in p2}) == [2, 4, 8, 16, 24, 32, 40, 48]
    assert all(sorted(p.cfg.seed for p in p2 if p.cfg.np == n) == [0, 1, 2] for n in {p.cfg.np for p in p2})
    assert all(p.cfg.epochs == 10 and p.cfg.batch_per_rank == 12 and p.cfg.lr == 5e-4 and p.cfg.val_split == 0
               and p.cfg.limit_train is None for p in p2)
    p1 = study("01_batch_sweep", "paper", **kw).plan()
    assert sorted({p.cfg.batch_per_node for p in p1}) == [8, 16, 24, 32] and len(p1) == 12 and all(p.timed for p in p1)


def test_selection_rule_and_fresh_test_seeds(tmp_path):
    t = pd.DataFrame({"candidate": ["a", "b", "c"], "val_acc_pct_mean": [50.0, 60.0, 60.0],
                      "val_acc_pct_std": [1.0, 3.0, 1.0], "at_chance": [0, 0, 0]})
    assert choose(t) == "c"  # tie on the mean: the smaller spread
    t.loc[2, "at_chance"] = 1
    assert choose(t) == "b"  # tie: fewer runs at chance first
    st = SelectionStudy("paper", out_dir=tmp_path / "f", results_root=tmp_path / "r")
    assert all(p.cfg.val_split == 5000 and p.cfg.seed in (0, 1, 2) for p in st.plan())
    winner = st.p["candidates"][-1]
    tp = st.test_plan(winner)
    assert [p.cfg.seed for p in tp] == [3, 4, 5] and all(p.cfg.val_split == 0 for p in tp)
    with pytest.raises(ValueError, match="fresh seeds"):
        SelectionStudy("paper", out_dir=tmp_path / "f", results_root=tmp_path / "r", test_seeds=[2, 3]).test_plan(winner)


def test_recommended_is_what_the_selection_study_chose():
    """profiles.RECOMMENDED is not an opinion: the rule, applied to the stored paper-profile selection runs,
    picks it (and its test runs use seeds the choice never saw)."""
    from pathlib import Path

    from labtools.profiles import RECOMMENDED

    root = Path(__file__).resolve().parents[1]
    st = SelectionStudy("paper", out_dir=root / "figures" / "paper", results_root=root / "results", run_missing=False)
    sel, winner, test = st.collect()
    assert len(sel) == len(st.plan()), "the paper-profile selection runs are not all in results/"
    assert winner == RECOMMENDED
    assert set(test.cfg_seed) == set(st.p["test_seeds"]) and not set(test.cfg_seed) & set(sel.cfg_seed)
