"""labtools.perfmodel: collective formulas, epoch/run times, the Table 2 frame, the paper-consistency
arithmetic, and the report's outputs being reproducible byte for byte. No MPI, no training."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from labtools import paper, profiles
from labtools import perfmodel as P
from labtools.data import TRAIN_SIZE

ROOT = Path(__file__).resolve().parents[1]
NET = P.Link(50e-6, 8e-9)      # about 1 Gbit/s
LOCAL = P.Link(2e-6, 1e-10)    # shared memory
N = 727_626 * P.FLOAT32_BYTES  # the SqueezeNet weight vector


def _report():
    spec = importlib.util.spec_from_file_location("perfmodel_report", ROOT / "bench" / "perfmodel_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------ collectives

def test_p2_one_rank_per_node_closed_forms():
    a, b = NET.alpha_s, NET.beta_s_per_byte
    assert P.allreduce_ring(2, N, NET, LOCAL) == pytest.approx(2 * a + N * b)
    assert P.allreduce_recursive_doubling(2, N, NET, LOCAL) == pytest.approx(a + N * b)
    assert P.gather_bcast(2, N, NET, LOCAL) == pytest.approx(2 * (a + N * b))
    assert P.bcast(2, N, NET, LOCAL) == pytest.approx(a + N * b)


def test_general_closed_forms_one_rank_per_node():
    a, b = NET.alpha_s, NET.beta_s_per_byte
    for p in (4, 8, 16, 32):
        assert P.allreduce_ring(p, N, NET, LOCAL) == pytest.approx(2 * (p - 1) / p * N * b + 2 * (p - 1) * a)
        assert P.allreduce_recursive_doubling(p, N, NET, LOCAL) == pytest.approx(math.log2(p) * (a + N * b))
        assert P.gather_root(p, N, NET, LOCAL) == pytest.approx((p - 1) * (a + N * b))


def test_two_ranks_share_a_nic():
    # recursive doubling: the distance-1 round stays in the node; in each network round both ranks of a
    # node exchange all n bytes through the one NIC
    assert P.allreduce_recursive_doubling(4, N, NET, LOCAL, r=2) == pytest.approx(LOCAL.msg(N) + NET.msg(2 * N))
    # the root's NIC takes the other nodes' p - 2 messages; its neighbour's comes over shared memory
    assert P.gather_root(8, N, NET, LOCAL, r=2) == pytest.approx(LOCAL.msg(N) + 6 * NET.msg(N))
    # one node: nothing crosses the network
    assert P.gather_bcast(2, N, NET, LOCAL, r=2) == pytest.approx(2 * LOCAL.msg(N))
    # a ring's network hops are one per NIC per direction: sharing costs nothing
    assert P.allreduce_ring(8, N, NET, LOCAL, r=2) == pytest.approx(P.allreduce_ring(8, N, NET, LOCAL, r=1))


def test_non_power_of_two_recursive_doubling_costs_two_more_exchanges():
    assert P.allreduce_recursive_doubling(6, N, NET, LOCAL) == pytest.approx(
        P.allreduce_recursive_doubling(4, N, NET, LOCAL) + 2 * NET.msg(N))


def test_mpich_bcast_choice():
    assert P.bcast(4, N, NET, LOCAL) == P.bcast_binomial(4, N, NET, LOCAL)
    assert P.bcast(16, N, NET, LOCAL) == P.bcast_scatter_allgather(16, N, NET, LOCAL)
    assert P.bcast(16, 1024, NET, LOCAL) == P.bcast_binomial(16, 1024, NET, LOCAL)


def test_pickling_adds_p_plus_one_messages():
    g = 1e-9
    assert P.gather_bcast(4, N, NET, LOCAL, 1, g) - P.gather_bcast(4, N, NET, LOCAL, 1) == pytest.approx(5 * g * N)


def test_fit_link_recovers_alpha_beta():
    sizes = [8, 64, 512, 4096, 524288, 1 << 20, N]
    link = P.fit_link(sizes, [NET.msg(n) for n in sizes])
    assert link.alpha_s == pytest.approx(NET.alpha_s, rel=1e-6)
    assert link.beta_s_per_byte == pytest.approx(NET.beta_s_per_byte, rel=1e-6)


def test_link_from_rate():
    assert P.link_from_rate("1gbit").beta_s_per_byte == pytest.approx(8e-9)
    assert P.link_from_rate("100mbit").beta_s_per_byte == pytest.approx(8e-8)
    with pytest.raises(ValueError):
        P.link_from_rate("fast")


# ------------------------------------------------------------------ epochs and runs

MACHINE = P.Machine(P.s_per_image_table1(), NET, LOCAL, 2, 12, "test")
STRATS = [P.Strategy("ea"), P.Strategy("lsgd", "local-sgd", 8), P.Strategy("ar", "allreduce", None, "ring"),
          P.Strategy("rd", "allreduce", None, "recursive-doubling")]


@pytest.mark.parametrize("s", STRATS, ids=lambda s: s.name)
def test_epoch_time_monotone_in_bytes(s):
    times = [P.epoch_time(s, 16, MACHINE, n)["epoch_s"] for n in (0, 1e3, 1e5, N, 10 * N)]
    assert all(x < y for x, y in zip(times, times[1:]))


def test_syncs_per_epoch_and_compute():
    steps = P.steps_per_epoch(48, 12)
    assert steps == math.ceil(math.ceil(TRAIN_SIZE / 48) / 12)
    assert P.syncs_per_epoch(P.Strategy("l", "local-sgd", 8), steps) == math.ceil(steps / 8)
    assert P.syncs_per_epoch(P.Strategy("a", "allreduce"), steps) == steps
    e = P.epoch_time(P.Strategy("ea"), 48, MACHINE, N)
    assert e["compute_s"] == pytest.approx(math.ceil(TRAIN_SIZE / 48) * MACHINE.s_per_image)
    assert P.epoch_time(P.Strategy("ea"), 1, MACHINE, N)["sync_s"] == 0


def test_speedup_efficiency_paper_definition():
    for r in paper.TABLE2:
        s = P.speedup(P.table2_base()["wall_s"], r["wall_s"])
        assert s == pytest.approx(r["speedup"], rel=1e-6)
        assert P.efficiency_pct(s, r["np"], P.table2_base()["np"]) == pytest.approx(r["efficiency_pct"], abs=0.01)


def test_strategies_from_profiles():
    names = [s.name for s in P.strategies(profiles.STRATEGIES, 0.1)]
    assert names[0] == next(iter(profiles.STRATEGIES))
    assert sum(s.startswith("allreduce, ") for s in names) == 2  # ring and recursive doubling, once
    assert all(s.compute_overhead == 0.1 for s in P.strategies(profiles.STRATEGIES, 0.1) if s.sync == "allreduce")


# ------------------------------------------------------------------ the paper

def test_calibrations_from_paper_constants():
    row = [r for r in paper.TABLE1 if r["batch_per_node"] == 24][0]
    assert P.s_per_image_table1(24) == row["mean_step_s"] / row["batch_per_rank"]
    m = P.with_compute(MACHINE, P.s_per_image_table2_base(MACHINE, N))
    base = P.table2_base()
    assert P.run_time(P.Strategy("ea"), base["np"], m, N, base["epochs"]) == pytest.approx(base["wall_s"])


def test_table2_frame_one_row_per_paper_row_with_error():
    t = P.table2_model({"a": MACHINE}, N)
    assert list(t["np"]) == [r["np"] for r in paper.TABLE2]
    assert list(t["paper_wall_s"]) == [r["wall_s"] for r in paper.TABLE2]
    assert t["a_error_pct"].tolist() == pytest.approx(
        (100 * (t["a_wall_s"] - t["paper_wall_s"]) / t["paper_wall_s"]).tolist())
    assert t.loc[0, "a_speedup"] == pytest.approx(1.0)


def test_consistency_arithmetic_from_constants():
    c = P.consistency(N, NET).set_index("check")["value"]
    row = [r for r in paper.TABLE1 if r["batch_per_node"] == 24][0]
    base = P.table2_base()
    epoch = TRAIN_SIZE / row["global_img_per_s"]
    assert c["one full epoch on one RPi at Table 1's rate"] == pytest.approx(epoch)
    assert c[f"Table 1 predicts Table 2's np = {base['np']} (one RPi, {base['epochs']} epochs)"] == \
        pytest.approx(base["epochs"] * epoch)
    assert c[f"node throughput Table 2's np = {base['np']} implies"] == \
        pytest.approx(base["epochs"] * TRAIN_SIZE / base["wall_s"])
    assert c["Table 1's 'epoch' is not a CIFAR-10 epoch"] == pytest.approx(row["avg_epoch_s"] * row["global_img_per_s"])
    assert c["printed speedups equal T(2) / T(np)"] < 1e-6


# ------------------------------------------------------------------ the report

def test_sidecar_has_no_date_and_is_stable(tmp_path):
    rep = _report()
    a = rep.write_sidecar(tmp_path, "x", ["x.csv"], ["r2", "r1"], {"in.json": "abc"}).read_bytes()
    b = rep.write_sidecar(tmp_path, "x", ["x.csv"], ["r1", "r2"], {"in.json": "abc"}).read_bytes()
    assert a == b and b"date_utc" not in a
    c = rep.write_sidecar(tmp_path, "x", ["x.csv"], ["r1", "r2"], {"in.json": "abd"}).read_bytes()
    assert c != a  # an input changed: so does the sidecar


@pytest.mark.skipif(not (ROOT / "bench" / "results" / "sync_costs.json").exists(), reason="no sync_costs.json")
def test_report_outputs_identical_on_rerun(tmp_path):
    rep = _report()
    first = {p.name: p.read_bytes() for p in rep.write_all(tmp_path / "a", str(ROOT / "results"))}
    second = {p.name: p.read_bytes() for p in rep.write_all(tmp_path / "b", str(ROOT / "results"))}
    assert first == second
    assert {"table2_model.csv", "table2_model.md", "fig_table2_model.png", "model_vs_here.md",
            "table2_model.provenance.json", "fig_table2_model.provenance.json"} <= set(first)
