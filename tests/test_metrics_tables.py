"""Scaling arithmetic against the paper's own Table 2, and tables/figures rebuilt from a fake run store."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from labtools import figures, metrics, numerics, paper, records, results, tables
from labtools.config import RunConfig


# ------------------------------------------------------------------ (a) the paper's arithmetic

def test_paper_table2_speedup_efficiency_recomputed():
    p = paper.table2()
    s = p.assign(t=p["wall_s"])
    got = metrics.add_scaling(s, "t", "np", base_np=2)
    # Speedups are printed with ~10 significant digits: they must agree to 1e-6.
    assert np.allclose(got["speedup"], p["speedup"], rtol=1e-6, atol=0)
    # Efficiencies are printed with 2 decimals: agreement up to rounding (0.005 pp).
    assert (got["efficiency_pct"] - p["efficiency_pct"]).abs().max() <= 0.005 + 1e-9
    assert (got["base_np"] == 2).all()
    assert metrics.speedup(5003.0, 432.11) == pytest.approx(11.5780704, rel=1e-8)
    assert metrics.efficiency(2.0, 8, 2) == pytest.approx(50.0)


def test_paper_table1_throughput_is_batch_over_step():
    # Documents what the paper's throughput means: images per node over the mean step time.
    p = paper.table1()
    assert np.allclose(p["batch_per_node"] / p["mean_step_s"], p["global_img_per_s"], rtol=2e-3)


def test_add_scaling_falls_back_to_smallest_np():
    df = pd.DataFrame({"np": [4, 8], "t": [100.0, 60.0]})
    got = metrics.add_scaling(df, "t", "np", base_np=2)
    assert (got["base_np"] == 4).all()
    assert got["speedup"].tolist() == pytest.approx([1.0, 100 / 60])
    assert got["efficiency_pct"].tolist() == pytest.approx([100.0, 100 / 60 / 2 * 100])


# ------------------------------------------------------------------ (c) aggregation

def test_aggregate_single_repeat_std_is_nan():
    df = pd.DataFrame({"g": [1, 2, 2], "x": [5.0, 1.0, 3.0]})
    a = metrics.aggregate(df, "g", ["x"]).set_index("g")
    assert math.isnan(a.loc[1, "x_std"]) and a.loc[1, "n_runs"] == 1 and a.loc[1, "x_mean"] == 5.0
    assert a.loc[2, "x_std"] == pytest.approx(np.std([1.0, 3.0], ddof=1))
    assert list(a.columns) == ["x_mean", "x_std", "n_runs"]


# ------------------------------------------------------------------ (b) a fake results store

def _write_run(root, experiment, world, processes, seed, batch=24, epochs=3, sync="epoch-average", cores=None,
               other=0.0):
    """A completed run record, written with labtools.results' own writers; values depend on (world, seed).

    All processes on one host "vm" with `cores` cores (default: one per process) and `other` cores of
    other load during the run, so the record's wall-time kind is decided as train.run decides it."""
    cfg = RunConfig(np=world, batch_per_node=batch, epochs=epochs, seed=seed, sync=sync, experiment=experiment,
                    out=str(root))
    run_id = f"np{world}-p{processes}-b{batch}-s{seed}"
    d = root / experiment / run_id
    rng = np.random.default_rng(1000 * world + 10 * processes + seed + batch)
    k = world // processes
    rank_rows, epoch_rows = [], []
    for e in range(1, epochs + 1):
        pwall = {p: 10.0 + rng.uniform(0, 2) + (5.0 if e == 1 else 0.0) for p in range(processes)}
        for r in range(world):
            p = r // k
            rank_rows.append({"rank": r, "epoch": e, "train_loss": 2.3 - 0.1 * e + rng.uniform(0, .05),
                              "train_acc": 0.1 + 0.05 * e + rng.uniform(0, .02), "samples": 1000 // world,
                              "epoch_s": pwall[p] / k, "mean_step_s": 0.01 * batch + rng.uniform(0, 1e-3),
                              "img_per_s": 50.0, "grad_norm": 1.0,
                              "peak_rss_mb": 600 + 10 * p + rng.uniform(0, 5) + (300 if e == 1 else 0),
                              "cpu_pct": 100 + rng.uniform(0, 10),
                              "process": p, "process_epoch_s": pwall[p]})
        # logical ranks of one process share its RSS/CPU: copy the process's first rank's values
        for row in rank_rows[-world:]:
            first = rank_rows[-world + row["process"] * k]
            row["cpu_pct"], row["peak_rss_mb"] = first["cpu_pct"], first["peak_rss_mb"]
        epoch_rows.append({"epoch": e, "test_loss": 2.0 - 0.1 * e, "test_acc": 0.2 + 0.05 * e,
                           "mean_train_loss": 1.0, "mean_train_acc": 0.5, "epoch_wall_s": max(pwall.values())})
    at_chance = world >= 8 and seed == 0
    summary = {"world": world, "processes": processes, "epochs": epochs, "sync": sync, "seed": seed,
               "batch_per_node": batch, "batch_per_rank": batch // 2,
               "test_acc": 0.1 if at_chance else float(rng.uniform(0.3, 0.6)),
               "test_loss": 2.302585 if (at_chance and world == 8) else float(rng.uniform(1, 2)),
               "mean_train_loss": float(rng.uniform(1, 2)), "mean_train_acc": float(rng.uniform(0.3, 0.6)),
               "global_wall_s": float(1000 / world + rng.uniform(0, 30)), "dead_conv10_frac": 0.1,
               "mean_epoch_s": float(np.mean([x["epoch_wall_s"] for x in epoch_rows]))}
    hosts, cores = ["vm"] * processes, {"vm": cores or processes}
    kind = records.wall_time_kind(world, processes, hosts, cores, {"vm": other})
    results.write_json(d / "manifest.json", {
        "config": cfg.to_dict(), "world": world, "processes": processes, "hosts": hosts, "cores_per_host": cores,
        "other_cores": {"vm": other}, "wall_time_kind": kind, "cluster_wall_time": kind == records.CLUSTER,
        "science_key": cfg.science_key(), "git_commit": "0" * 40, "numerics_version": numerics.VERSION,
        "status": "completed"})
    results.write_csv(d / "epochs.csv", epoch_rows)
    for r in range(world):
        results.write_csv(d / "ranks" / f"rank_{r:03d}.csv", [x for x in rank_rows if x["rank"] == r])
    results.write_json(d / "summary.json", summary)
    return d


# (world, processes, seeds, cores on the host, other load): np=2 is timed as a cluster; np=4 ran 4
# processes on 2 cores (seeds 0-1) and as logical ranks (seed 2); np=8 and 16 are logical ranks; one np=2
# run (seed 3) ran beside other work.
SCALING = [(2, 2, (0, 1, 2), 2, 0.0), (2, 2, (3,), 2, 1.2), (4, 4, (0, 1), 2, 0.0), (4, 2, (2,), 2, 0.0),
           (8, 2, (0, 1), 2, 0.0), (16, 2, (0,), 2, 0.0)]


@pytest.fixture
def store(tmp_path):
    root = tmp_path / "results"
    for world, procs, seeds, cores, other in SCALING:
        for s in seeds:
            _write_run(root, "scaling", world, procs, s, cores=cores, other=other)
    for b in (8, 16, 24):
        for s in (0, 1):
            _write_run(root, "batch", 2, 2, s, batch=b)
    _write_run(root, "batch-logical", 4, 2, 0, batch=8)  # 2 logical ranks per process: not a timing
    return root


def test_table2_pools_seeds_across_p_and_times_only_clusters(store):
    runs = results.load_runs(store, "scaling")
    t = tables.table2_scaling(runs, base_np=2)
    assert t["np"].tolist() == [2, 4, 8, 16]
    assert sorted(t.attrs["run_ids"]) == sorted(runs["run_id"])
    sums = {}
    for d in (store / "scaling").iterdir():
        if d.is_dir():
            sums.setdefault(int(d.name.split("-")[0][2:]), []).append(
                (json.loads((d / "summary.json").read_text()), json.loads((d / "manifest.json").read_text())))
    for row in t.itertuples():
        ss = [s for s, _ in sums[row.np]]
        assert row.n_runs == len(ss)  # every seed, whatever P ran it
        assert row.seeds == ",".join(str(s["seed"]) for s in sorted(ss, key=lambda s: s["seed"]))
        for col, key, scale in [("test_acc_pct", "test_acc", 100), ("test_loss", "test_loss", 1),
                                ("mean_train_loss", "mean_train_loss", 1), ("mean_train_acc_pct", "mean_train_acc", 100)]:
            v = np.array([s[key] * scale for s in ss])
            assert getattr(row, f"{col}_mean") == pytest.approx(v.mean(), rel=1e-12)
            std = getattr(row, f"{col}_std")
            assert math.isnan(std) if len(v) == 1 else std == pytest.approx(v.std(ddof=1), rel=1e-12)
        assert row.collapsed == sum(metrics.is_collapsed(s["test_loss"]) for s in ss)
        assert row.at_chance == sum(metrics.is_at_chance(s["test_acc"], s["test_loss"]) for s in ss)
        timed = [s["global_wall_s"] for s, m in sums[row.np] if m["wall_time_kind"] == records.CLUSTER]
        assert row.n_timed == len(timed)
        if timed:
            assert row.wall_time_kind == records.CLUSTER and row.wall_s_mean == pytest.approx(np.mean(timed))
        else:
            assert records.CLUSTER not in row.wall_time_kind and "not a cluster time" in row.wall_time_kind
            assert math.isnan(row.speedup) and math.isnan(row.efficiency_pct)
    k = t.set_index("np")
    assert k.loc[2, "n_runs"] == 4 and k.loc[2, "n_timed"] == 3  # the contended run counts for accuracy only
    assert k.loc[2, "speedup"] == 1.0 and k.loc[2, "efficiency_pct"] == 100.0 and k.loc[2, "speedup_std"] == 0.0
    assert records.OVERSUBSCRIBED in k.loc[4, "wall_time_kind"] and records.LOGICAL in k.loc[4, "wall_time_kind"]
    assert k.loc[4, "processes"] == "2,4"
    assert k.loc[8, "collapsed"] == 1 and k.loc[16, "collapsed"] == 0 and k.loc[16, "at_chance"] == 1
    per_run = tables.table2_per_run(runs)
    assert len(per_run) == len(runs) and set(per_run.wall_time_kind) <= set(records.KINDS)


def test_strategy_beside_paper_table2(store):
    runs = results.load_runs(store, "scaling")
    ts = tables.strategy_table(runs, ["epoch-average (paper)"] * len(runs))
    t = tables.strategy_vs_paper(ts).set_index("np")
    ref = paper.table2().set_index("np")
    assert list(t.index) == list(ref.index)  # every np of the paper, ours or not
    assert (t.paper_test_acc_pct == ref.test_acc_pct).all() and (t.paper_test_loss == ref.test_loss).all()
    for n, sel in runs.groupby("world"):
        assert t.loc[n, "test_acc_pct_mean"] == pytest.approx(100 * sel.test_acc.mean())
        assert t.loc[n, "n_runs"] == len(sel) and t.loc[n, "collapsed"] == int(sel.collapsed.sum())
    unrun = t.loc[[24, 32, 40, 48]]
    assert (unrun.n_runs == 0).all() and unrun.test_acc_pct_mean.isna().all()
    assert t.attrs["run_ids"] == sorted(runs.run_id)
    with pytest.raises(ValueError, match="one strategy"):
        tables.strategy_vs_paper(tables.strategy_table(runs, ["a", "b"] * (len(runs) // 2) + ["a"] * (len(runs) % 2)))


def test_table_refuses_mixed_protocols(store):
    _write_run(store, "scaling", 4, 4, 7, sync="allreduce")
    with pytest.raises(ValueError, match="cfg_sync"):
        tables.table2_scaling(results.load_runs(store, "scaling"))


def test_table1_uses_the_papers_definitions(store):
    runs = results.load_runs(store, "batch")
    t = tables.table1_batch_sweep(runs, tables.load_rank_epochs_by_run(runs))
    assert t["batch_per_node"].tolist() == [8, 16, 24] and t["batch_per_rank"].tolist() == [4, 8, 12]
    for row in t.itertuples():
        per_run = []
        for r in runs[runs["cfg_batch_per_node"] == row.batch_per_node].itertuples():
            rk = results.load_rank_epochs(r.run_dir)
            ep = results.load_epochs(r.run_dir)
            step = rk["mean_step_s"].mean()
            per_run.append({"avg_epoch_s": ep["epoch_wall_s"].mean(),  # every epoch, the first included
                            "avg_epoch_warm_s": ep.loc[ep["epoch"] > 1, "epoch_wall_s"].mean(),
                            "mean_step_s": step, "global_img_per_s": row.batch_per_node / step,  # one node
                            "end_to_end_img_per_s": (rk.groupby("epoch")["samples"].sum()
                                                     / ep.set_index("epoch")["epoch_wall_s"]).mean(),
                            "peak_rss_mb": rk["peak_rss_mb"].max(),  # over the whole run: epoch 1 included
                            "cpu_pct": rk["cpu_pct"].mean()})
        direct = pd.DataFrame(per_run)
        assert row.n_runs == len(direct) and row.seeds == "0,1"
        for col in tables.TABLE1_METRICS:
            assert getattr(row, f"{col}_mean") == pytest.approx(direct[col].mean(), rel=1e-9), col
        assert row.peak_rss_mb_mean > 900  # the epoch-1 peak is in
    assert len(tables.table1_per_run(runs)) == len(runs)
    assert set(t.wall_time_kind) == {records.CLUSTER}
    # runs that are not cluster timings still make a Table 1, and every row says why it is not a cluster's
    logical = results.load_runs(store, "batch-logical")
    t = tables.table1_batch_sweep(logical, tables.load_rank_epochs_by_run(logical))
    assert len(t) and set(t.wall_time_kind) == {records.LOGICAL}
    # a row with a cluster timing uses only those; a row without pools its runs, labelled (a busy machine)
    _write_run(store, "batch", 2, 2, 2, batch=8, cores=2, other=1.2)
    _write_run(store, "batch", 2, 2, 2, batch=32, cores=2, other=1.2)
    busy = results.load_runs(store, "batch")
    mixed = tables.table1_batch_sweep(busy, tables.load_rank_epochs_by_run(busy)).set_index("batch_per_node")
    assert mixed.n_runs.to_dict() == {8: 2, 16: 2, 24: 2, 32: 1}
    assert mixed.wall_time_kind.to_dict() == {8: records.CLUSTER, 16: records.CLUSTER, 24: records.CLUSTER,
                                              32: records.CONTENDED}


def test_save_table_and_figures_write_all_files(store, tmp_path):
    runs = results.load_runs(store, "scaling")
    t2 = tables.table2_scaling(runs)
    out = tmp_path / "out"
    paths = tables.save_table(t2, out, "table2", {"experiment": "scaling"})
    assert sorted(p.name for p in paths) == sorted(
        ["table2.csv", "table2.md", "table2.tex", "table2.provenance.json"])
    assert all(p.stat().st_size > 0 for p in paths)
    back = pd.read_csv(out / "table2.csv")
    assert back["wall_s_mean"].tolist() == pytest.approx(t2["wall_s_mean"].tolist())
    md, tex = (out / "table2.md").read_text(), (out / "table2.tex").read_text()
    assert "±" in md and "test acc (%)" in md and r"\pm" in tex and r"\begin{tabular}" in tex
    side = json.loads((out / "table2.provenance.json").read_text())
    assert side["run_ids"] == sorted(runs["run_id"]) and side["experiment"] == "scaling"
    assert {"git_commit", "versions", "host"} <= set(side) and "date_utc" not in side  # same inputs, same bytes
    # the dependency-free renderers used when tabulate/jinja2 are missing
    view = tables.display_frame(t2)
    assert tables._markdown(view).count("\n") == len(view) + 1
    assert tables._latex(view).count(r" \\") == len(view) + 1

    brun = results.load_runs(store, "batch")
    t1 = tables.table1_batch_sweep(brun, tables.load_rank_epochs_by_run(brun))
    tables.save_table(t1, out, "table1", {})
    one = brun[brun["world"] == 2].iloc[0]
    figs = {"fig_batch_sweep": figures.fig_batch_sweep(t1),
            "fig_rank_epoch_log": figures.fig_rank_epoch_log(results.load_rank_epochs(one.run_dir), 2, one.run_id),
            **{f: getattr(figures, f)(t2, tables.table2_per_run(runs)) for f in ("fig_speedup", "fig_efficiency", "fig_train_accuracy",
                                                       "fig_total_time", "fig_train_loss", "fig_test_accuracy")}}
    for name, fig in figs.items():
        paths = figures.save_figure(fig, out / "fig", name, {"table": "table2"})
        assert [p.name for p in paths] == [f"{name}.png", f"{name}.pdf", f"{name}.provenance.json"]
        assert paths[0].read_bytes()[:4] == b"\x89PNG" and paths[1].read_bytes()[:4] == b"%PDF"
        side = json.loads(paths[2].read_text())
        assert side["run_ids"] and side["table"] == "table2"
    labels = [t.get_text() for t in figs["fig_total_time"].axes[0].get_legend().get_texts()]
    assert paper.PAPER_LABEL in labels
    assert any("NOT a cluster time" in s and "logical ranks (P<N)" in s for s in labels)
    sp = [t.get_text() for t in figs["fig_speedup"].axes[0].get_legend().get_texts()]
    assert any(s.startswith("no value at np=4, 8, 16") for s in sp)
    assert not any(".tmp" in p.name or p.name.startswith(".") for p in (out / "fig").iterdir())


def test_report_puts_the_paper_beside_every_row(store, tmp_path):
    from labtools import report

    runs = results.load_runs(store, "scaling")
    brun = results.load_runs(store, "batch")
    out = tmp_path / "figures" / "paper"
    t2 = tables.table2_scaling(runs)
    tables.save_table(t2, out / "tables", "table2_strong_scaling")
    tables.save_table(tables.table2_per_run(runs), out / "tables", "table2_strong_scaling_runs")
    tables.save_table(tables.table1_batch_sweep(brun, tables.load_rank_epochs_by_run(brun)), out / "tables",
                      "table1_batch_sweep")
    paths = report.write_report(out)
    md = paths[0].read_text()
    assert "## At a glance" in md and "61.61" in md  # the paper's np = 2 value, from labtools.paper
    for row in t2.itertuples():  # every regenerated row, with our value as the table has it
        assert f"| {row.np} | " in md and report._pm(row.test_acc_pct_mean, row.test_acc_pct_std) in md
    assert "Figures 4-12" in md and "not comparable here" in md
    assert paths[1].read_text().startswith("<!doctype html>") and "<table>" in paths[1].read_text()


@pytest.mark.parametrize("paper_acc,mean,n,chance,verdict", [
    (61.61, 60.0, 3, 0, "reproduced (-1.6 points)"), (61.61, 50.0, 3, 0, "differs (-11.6 points)"),
    (61.61, 28.0, 3, 1, "differs: 1 of 3 seeds at chance here"), (46.6, 10.0, 3, 3, "collapsed here"),
    (10.0, 10.0, 3, 3, "reproduced (collapse)"), (10.0, 14.0, 3, 2, "differs: 2 of 3 seeds at chance here"),
    (10.0, 22.0, 3, 0, "differs: trains here, no seed at chance")])
def test_accuracy_verdicts(paper_acc, mean, n, chance, verdict):
    from labtools.report import accuracy_verdict

    assert accuracy_verdict(paper_acc, mean, n, chance) == verdict


def test_committed_paper_report_links_resolve_and_marks_follow_the_records():
    """figures/paper/REPORT.md (rendered from the committed store results/): every link resolves, and each
    seed's at-chance mark is what its linked record says (<= 11 % or an exact collapse)."""
    from pathlib import Path

    from report_check import report_problems

    assert report_problems(Path(__file__).resolve().parents[1] / "figures" / "paper") == []
