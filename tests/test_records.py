"""Run facts decided once, and the one migration of old records: np resolved, wall-time kind, numerics, outcomes."""
import math

import pytest

from labtools import metrics, numerics, records
from labtools.config import RunConfig


def test_np_is_resolved_before_hashing():
    assert RunConfig(np=None).science_key(world=2) == RunConfig(np=2).science_key()
    assert RunConfig(np=2).science_key() != RunConfig(np=4).science_key()
    with pytest.raises(ValueError):
        RunConfig(np=None).science_key()


def test_new_fields_at_their_default_keep_old_keys():
    # val_split 0 (the paper's protocol) must hash as records made before the field existed
    d = RunConfig(np=2).to_dict()
    assert RunConfig(**{**d, "val_split": 0}).science_key() == RunConfig(np=2).science_key()
    assert RunConfig(**{**d, "val_split": 5000}).science_key() != RunConfig(np=2).science_key()


@pytest.mark.parametrize("world,procs,hosts,cores,other,kind", [
    (2, 2, ["a", "a"], {"a": 2}, {"a": 0.0}, records.CLUSTER),
    (4, 4, ["a"] * 4, {"a": 2}, {"a": 0.0}, records.OVERSUBSCRIBED),
    (4, 4, ["a", "a", "b", "b"], {"a": 2, "b": 2}, {"a": 0.0, "b": 0.1}, records.CLUSTER),
    (4, 4, ["a", "a", "b", "b"], {"a": 2, "b": 2}, {"a": 0.0, "b": 0.9}, records.CONTENDED),
    (8, 2, ["a", "a"], {"a": 2}, {"a": 0.0}, records.LOGICAL),
    (2, 2, ["a", "a"], None, None, records.UNKNOWN),
    (2, 2, ["a", "a"], {"a": 2}, None, records.UNKNOWN_LOAD),
])
def test_wall_time_kind(world, procs, hosts, cores, other, kind):
    assert records.wall_time_kind(world, procs, hosts, cores, other) == kind


def test_other_load_subtracts_the_runs_own_cpu():
    # two processes on host a (each 9 s of CPU in 10 s), the host busy 20 s: 2 s of other work = 0.2 cores
    spans = [("a", 10.0, 9.0, 20.0), ("a", 9.5, 9.0, 20.0), ("b", 10.0, 10.0, 10.0)]
    load = records.other_load(spans)
    assert load["a"] == pytest.approx(0.2) and load["b"] == pytest.approx(0.0)


def _old(**kw):
    m = {"config": {**RunConfig().to_dict(), "np": None}, "world": 2, "processes": 2, "hosts": ["h", "h"],
         "git_commit": "e60faae22ffc16ec475588ed0373845ce1e66f4d", "science_key": "stale-key", "cluster_wall_time": True}
    m.update(kw)
    return m


def test_migrate_an_old_record():
    m, s = records.migrate(_old(), {"test_acc": 0.1011, "test_loss": 2.29, "dead_conv10_frac": 0.5})
    assert m["config"]["np"] == 2 and m["science_key"] == RunConfig(np=2).science_key()
    assert m["wall_time_kind"] == records.UNKNOWN and m["cluster_wall_time"] is False  # no cores_per_host
    assert m["numerics_version"] == 2 and m["numerics_current"]
    assert s["eval_set"] == "test" and s["at_chance"] and not s["collapsed"]  # 10.11 %: at chance, not at ln 10
    old_cfg = {k: v for k, v in RunConfig().to_dict().items() if k not in ("lr_schedule", "val_split")}
    m, _ = records.migrate(_old(config=old_cfg))
    assert m["config"]["lr_schedule"] == "constant" and m["config"]["val_split"] == 0  # fields added later
    m, _ = records.migrate(_old(cores_per_host={"h": 2}))
    assert m["wall_time_kind"] == records.UNKNOWN_LOAD and not m["cluster_wall_time"]  # load never measured


def test_migrate_numerics_from_the_commit():
    v1 = "0be2528ef73fc5e5a9e7ab53b30999e200168533"
    cfg = {**RunConfig().to_dict(), "sync": "allreduce"}
    assert not records.migrate(_old(git_commit=v1, config=cfg))[0]["numerics_current"]  # v2 changed allreduce
    assert records.migrate(_old(git_commit=v1))[0]["numerics_current"]  # ... and nothing else
    assert not records.migrate(_old(git_commit=v1 + "+dirty"))[0]["numerics_current"]  # unknown code
    assert not records.migrate(_old(git_commit="f" * 40))[0]["numerics_current"]  # a commit we cannot place
    new = records.migrate(_old(numerics_version=numerics.VERSION, git_commit=None))[0]
    assert new["numerics_current"]
    dirty = _old(numerics_version=numerics.VERSION, numerics_sources="0" * 16, git_commit="abc+dirty")
    assert not records.migrate(dirty)[0]["numerics_current"]  # same version, other numerics code
    same = _old(numerics_version=numerics.VERSION, numerics_sources=numerics.SOURCES_SHA, git_commit="abc+dirty")
    assert records.migrate(same)[0]["numerics_current"]


def test_outcome_definitions():
    assert metrics.is_collapsed(math.log(10) + 5e-4) and not metrics.is_collapsed(2.29)
    assert metrics.is_at_chance(0.11) and not metrics.is_at_chance(0.1101)
    assert metrics.is_at_chance(0.5, loss=math.log(10))  # a superset of the exact collapse
    assert not metrics.is_at_chance(0.199, loss=2.1)  # 19.9 %: trains, whatever the conv10 probe says
    # a record whose probe found every conv10 channel dead is at chance only by its accuracy or loss
    _, s = records.migrate(_old(), {"test_acc": 0.199, "test_loss": 2.1, "dead_conv10_frac": 1.0})
    assert not s["at_chance"] and not s["collapsed"]


def test_load_runs_says_when_a_folder_holds_no_records(tmp_path):
    """An empty table never comes back silently; a missing folder is an error."""
    from labtools import results

    (tmp_path / "exp").mkdir()
    with pytest.warns(UserWarning, match=r"no completed run records in .*exp"):
        assert results.load_runs(tmp_path, "exp").empty
    with pytest.raises(FileNotFoundError, match="no results folder"):
        results.load_runs(tmp_path, "nosuch")
