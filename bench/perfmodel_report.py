"""Apply the performance model (labtools.perfmodel) to the paper's cluster and to this machine.

Writes figures/perfmodel/ (each file with a provenance sidecar, no timestamps: the same inputs give
the same bytes):

- table2_model.csv / .md: the paper's Table 2 wall times beside the model's, error per row, for two
  calibrations of compute (Table 1's RPi 4 step time; Table 2's own np = 2 run); in the .md also the
  paper-consistency arithmetic, each sync strategy at np = 48, and the predicted time to reach the
  paper's best test accuracy at np = 48 with labtools' recommended configuration;
- scaling_strategies.csv: predicted wall time, speedup and efficiency per strategy and np (Figures 8, 9, 11);
- fig_table2_model.png / .pdf: paper vs model wall time; predicted speedup and efficiency per strategy;
- model_vs_here.md: the model against what this machine measured (the collectives in sync_costs.json,
  P = 1 and P = 2 run records of the paper's configuration, the allreduce step, the emulated hosts).

Inputs: bench/results/{sync_costs, emulated_cluster, allreduce_overhead_p2, allreduce_step_breakdown_p2}.json
and run records under results/.

    .venv/bin/python bench/perfmodel_report.py [--out figures/perfmodel] [--results results]
"""
from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from labtools import figures, paper, perfmodel as P, profiles, results, tables  # noqa: E402
from labtools.config import RunConfig  # noqa: E402

BENCH = ROOT / "bench" / "results"
INPUTS = {"sync_costs": "sync_costs.json", "emulated_cluster": "emulated_cluster.json",
          "allreduce_overhead": "allreduce_overhead_p2.json", "step_breakdown": "allreduce_step_breakdown_p2.json"}
CAL = {"model_table1": "compute from Table 1 (RPi 4, batch 24/node)",
       "model_base": "compute from Table 2's np = 2 run"}
# Config fields that do not change what a run computes per image (bookkeeping, seeds, threads, np).
NOT_SCIENCE = {"np", "ranks_per_node", "batch_per_node", "seed", "threads", "experiment", "run_id", "out", "label",
               "quiet", "diagnostics", "checkpoint", "wait_limit", "cifar_dir"}


# ------------------------------------------------------------------ inputs

def load_inputs(bench_dir: Path = BENCH) -> tuple[dict, dict]:
    """({name: parsed JSON}, {relative path: sha256 prefix}) of the bench results the model uses."""
    data, digests = {}, {}
    for key, fname in INPUTS.items():
        path = Path(bench_dir) / fname
        raw = path.read_bytes()
        data[key] = results.read_json(path)
        digests[str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)] = \
            hashlib.sha256(raw).hexdigest()[:16]
    return data, digests


def link(fit: dict) -> P.Link:
    return P.Link(fit["alpha_s"], fit["beta_s_per_byte"])


def net_link(sc: dict) -> P.Link:
    """The 1 Gbit/s link: two emulated hosts, one process each (nothing else on the link)."""
    return link(sc["settings"]["emulated_2x1"]["fit"]["pingpong_rank1"])


def paper_cluster(sc: dict) -> dict:
    """{label: Machine} for the paper's cluster, one per compute calibration. Links: nodes over the
    measured emulated 1 Gbit/s link; within a node, and pickling, this machine's (an RPi 4's are not
    measured; both are small next to the network and the compute)."""
    cfg = RunConfig()
    here = sc["settings"]["here"]["fit"]
    proto = P.Machine(0.0, net_link(sc), link(here["pingpong_rank1"]), cfg.ranks_per_node, cfg.batch_per_rank,
                      "", here["pickle"]["s_per_byte"])
    n = sc["weight_bytes"]
    return {"model_table1": P.with_compute(proto, P.s_per_image_table1(cfg.batch_per_node), CAL["model_table1"]),
            "model_base": P.with_compute(proto, P.s_per_image_table2_base(proto, n), CAL["model_base"])}


def model_strategies(breakdown: dict) -> list[P.Strategy]:
    """labtools' named strategies, plus the epoch average done with an Allreduce; per-step allreduce pays
    the gradient packing measured in allreduce_step_breakdown_p2.json."""
    over = breakdown["overhead_pct"]["pack_unpack_only"] / 100.0
    out = P.strategies(profiles.STRATEGIES, over)
    out.insert(1, P.Strategy("epoch-average via Allreduce (ring)", "epoch-average", None, "ring"))
    return out


# ------------------------------------------------------------------ the paper's cluster

def table2_frame(sc: dict):
    machines = paper_cluster(sc)
    return P.table2_model(machines, sc["weight_bytes"], P.Strategy(next(iter(profiles.STRATEGIES)))), machines


def strategy_curves(machines: dict, strategies, n_bytes: float):
    import pandas as pd

    nps = [r["np"] for r in paper.TABLE2]
    base = P.table2_base()
    parts = [P.scaling_curve(s, nps, m, n_bytes, base["epochs"], base["np"]).assign(calibration=label)
             for label, m in machines.items() for s in strategies]
    return pd.concat(parts, ignore_index=True)


def recommended_to_target(results_root: str):
    """Epochs the recommended configuration needs at np = 48 to reach the paper's best test accuracy:
    (target %, target np, first epoch of the seed-mean curve or None, per-seed first epochs, run ids, world)."""
    runs = results.load_runs(results_root, "selection-paper")
    runs = runs[runs["eval_set"] == "test"]
    cfgs = [{k[4:]: v for k, v in row.items() if k.startswith("cfg_")} for _, row in runs.iterrows()]
    keep = [profiles.strategy_of(c, [profiles.RECOMMENDED], profiles.SELECTION_CANDIDATES) == profiles.RECOMMENDED
            for c in cfgs]
    runs = runs[keep]
    best = max(paper.TABLE2, key=lambda r: r["test_acc_pct"])
    target = best["test_acc_pct"] / 100.0
    curves = {row.run_id: list(results.load_epochs(row.run_dir)["test_acc"]) for row in runs.itertuples()}
    first = lambda accs: next((i + 1 for i, a in enumerate(accs) if a >= target), None)  # noqa: E731
    per_seed = {rid: first(c) for rid, c in sorted(curves.items())}
    mean_curve = [statistics.fmean(v) for v in zip(*curves.values())] if curves else []
    worlds = sorted(set(runs["world"]))
    return {"target_pct": best["test_acc_pct"], "target_np": best["np"], "epochs": first(mean_curve),
            "mean_curve": mean_curve, "per_seed": per_seed, "run_ids": sorted(curves), "world": worlds}


# ------------------------------------------------------------------ this machine

def _science(row) -> dict:
    return {k[4:]: (None if v != v else v) for k, v in row.items()  # NaN -> None, so equal configs compare equal
            if k.startswith("cfg_") and k[4:] not in NOT_SCIENCE}


def same_config_runs(results_root: str):
    """P = 2 runs timed as a cluster's (scaling-paper, np = 2) and P = 1 runs of the same configuration
    (same batch per rank and every science field; np = 1)."""
    runs = results.load_runs(results_root)
    p2 = runs[(runs["experiment"] == "scaling-paper") & (runs["world"] == 2) & (runs["processes"] == 2)
              & runs["wall_time_kind"].str.startswith("cluster")]
    ref, b = _science(p2.iloc[0]), int(p2.iloc[0]["batch_per_rank"])
    p1 = runs[(runs["world"] == 1) & (runs["processes"] == 1) & (runs["batch_per_rank"] == b)]
    p1 = p1[[_science(r) == ref for _, r in p1.iterrows()]]
    return p1, p2


def _epoch_medians(runs) -> tuple[float, float]:
    """(median epoch_wall_s, median sync_s) over every epoch of every run: robust to the first
    epoch's graph tracing and to other load in some epochs."""
    ep = [results.load_epochs(d) for d in runs["run_dir"]]
    return (statistics.median(v for e in ep for v in e["epoch_wall_s"]),
            statistics.median(v for e in ep for v in e["sync_s"]))


def _err(model: float, measured: float) -> float:
    return 100.0 * (model - measured) / measured


def setting_machine(st: dict) -> P.Machine:
    """Links of one sync_costs setting: ranks 0-1 share a host when processes_per_host > 1."""
    fit, r = st["fit"], st["processes_per_host"]
    local = link(fit["pingpong_rank1"])
    net = link(fit["pingpong_last"]) if r > 1 and "pingpong_last" in fit else local
    return P.Machine(0.0, net, local, r, 1, "", fit["pickle"]["s_per_byte"])


def collectives_vs_model(sc: dict):
    """Each measured collective against the model priced with the same setting's ping-pong fit."""
    import pandas as pd

    rows = []
    for name, st in sc["settings"].items():
        m, p = setting_machine(st), st["p"]
        pred = {"gather + bcast (pickled)": lambda n: P.collective("gather-bcast", p, n, m),
                "Bcast": lambda n: P.bcast(p, n, m.net, m.local, m.ranks_per_node),
                "Allreduce vs ring": lambda n: P.allreduce_ring(p, n, m.net, m.local, m.ranks_per_node),
                "Allreduce vs recursive doubling":
                    lambda n: P.allreduce_recursive_doubling(p, n, m.net, m.local, m.ranks_per_node)}
        ops = {"gather + bcast (pickled)": "gather_bcast", "Bcast": "bcast", "Allreduce vs ring": "allreduce",
               "Allreduce vs recursive doubling": "allreduce"}
        for label, op in ops.items():
            meas = {int(k): v for k, v in st[op].items()}
            errs = [_err(pred[label](n), t) for n, t in meas.items()]
            n = max(meas)
            rows.append({"setting": name, "p": p, "ranks/host": st["processes_per_host"], "collective": label,
                         "bytes": n, "measured_ms": 1e3 * meas[n], "model_ms": 1e3 * pred[label](n),
                         "error_pct": _err(pred[label](n), meas[n]),
                         "median_abs_error_pct_all_sizes": statistics.median(abs(e) for e in errs)})
    return pd.DataFrame(rows)


def runs_vs_model(sc: dict, ao: dict, breakdown: dict, results_root: str):
    """labtools runs here: P = 1 calibrates compute, P = 2 is predicted; the allreduce step at P = 2."""
    import pandas as pd

    n = sc["weight_bytes"]
    here = setting_machine(sc["settings"]["here"])
    p1, p2 = same_config_runs(results_root)
    ep1, _ = _epoch_medians(p1)
    ep2, sync2 = _epoch_medians(p2)
    m = P.with_compute(here, ep1 / P.images_per_rank(1))
    m = P.Machine(m.s_per_image, m.net, m.local, int(p2.iloc[0]["cfg_ranks_per_node"]),
                  int(p2.iloc[0]["batch_per_rank"]), "here", m.pickle_s_per_byte)
    e2 = P.epoch_time(P.Strategy("epoch-average"), 2, m, n)
    ring = P.allreduce_ring(2, n, m.net, m.local, m.ranks_per_node)
    ea, ar = ao["mean_step_s"]["epoch-average"], ao["mean_step_s"]["allreduce"]
    bd = breakdown["overhead_pct"]["pack_unpack_only"] / 100.0
    rows = [
        {"what": "epoch time, np = 2 on P = 2 (epoch-average)", "calibration": f"P = 1 runs' median epoch ({len(p1)} runs)",
         "measured_s": ep2, "model_s": e2["epoch_s"]},
        {"what": "sync time per epoch, np = 2 (labtools' gather + average + bcast)", "calibration": "sync_costs here",
         "measured_s": sync2, "model_s": e2["sync_s"]},
        {"what": "allreduce step, P = 2 (compute + Allreduce)", "calibration": "the epoch-average step of the same bench",
         "measured_s": ar, "model_s": ea + ring},
        {"what": "allreduce step, P = 2, Adam replicated (LABTOOLS_SHARDED_ADAM=0, as at P > 2), with the gradient "
                 "packing measured in allreduce_step_breakdown_p2.json",
         "calibration": "as above", "measured_s": ao["mean_step_s"].get("allreduce, Adam replicated", ar),
         "model_s": ea * (1 + bd) + ring},
    ]
    df = pd.DataFrame(rows)
    df["error_pct"] = [_err(a, b) for a, b in zip(df["model_s"], df["measured_s"])]
    df.attrs["run_ids"] = sorted(list(p1["run_id"]) + list(p2["run_id"]))
    df.attrs["kinds"] = sorted(set(p1["wall_time_kind"]) | set(p2["wall_time_kind"]))
    return df


def emulated_vs_model(sc: dict, ec: dict):
    """bench/emulated_cluster.json per np: sync and epoch time against the model. Compute is calibrated
    on the np = 2 row and scaled by images per rank and by processes per core (all hosts share this
    machine's cores)."""
    import pandas as pd

    n, cores = sc["weight_bytes"], sc["cpu_count"]
    em = sc["settings"]
    m = P.Machine(0.0, net_link(sc), link(em["emulated_2x2"]["fit"]["pingpong_rank1"]), ec["processes_per_host"],
                  next(iter(ec["runs"].values()))["batch_per_rank"], "emulated", em["emulated_2x1"]["fit"]["pickle"]["s_per_byte"])
    runs = {int(k): v for k, v in ec["runs"].items()}
    base = min(runs)
    share = lambda np_: max(1.0, np_ / cores)  # noqa: E731  (processes per core)
    s_img = runs[base]["compute_s"][0] / P.images_per_rank(base, ec["limit_train"]) / share(base)
    rows = []
    for np_, r in sorted(runs.items()):
        e = P.epoch_time(P.Strategy("epoch-average"), np_, P.with_compute(m, s_img * share(np_)), n, ec["limit_train"])
        rows.append({"np": np_, "hosts": len(r["hosts"]), "loadavg_1m_before": r["loadavg_1m_before"],
                     "measured_sync_s": r["sync_s"][0], "model_sync_s": e["sync_s"],
                     "sync_error_pct": _err(e["sync_s"], r["sync_s"][0]), "measured_epoch_s": r["epoch_wall_s"][0],
                     "model_epoch_s": e["epoch_s"], "epoch_error_pct": _err(e["epoch_s"], r["epoch_wall_s"][0])})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------ writing

def md_table(df, fmt: dict | None = None) -> str:
    fmt = fmt or {}
    cols = list(df.columns)
    def cell(c, v):
        if v is None or v != v:  # None or NaN: an empty cell
            return ""
        return (fmt[c].format(v) if c in fmt else str(v)).replace("|", r"\|")

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(c, v) for c, v in zip(cols, row)) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def write_sidecar(out_dir: Path, name: str, files, run_ids, inputs: dict, extra: dict | None = None) -> Path:
    """tables.provenance_block without its date: a sidecar changes only when its inputs do."""
    block = tables.provenance_block({**(extra or {}), "inputs": inputs}, sorted(run_ids), name, list(files))
    block.pop("date_utc", None)
    path = Path(out_dir) / f"{name}.provenance.json"
    results.write_json(path, block)
    return path


def _fmt_s(v):
    return f"{v:,.1f}"


def table2_markdown(t2, machines, sc, curves, tta, strategies) -> str:
    t2 = t2.assign(beyond=(t2["paper_wall_s"] - (t2["model_base_wall_s"] - t2["model_base_sync_s"])) / t2["epochs"])
    show = t2[["np", "rpis", "paper_wall_s", "model_table1_wall_s", "model_table1_error_pct", "model_base_wall_s",
               "model_base_error_pct", "paper_speedup", "model_base_speedup", "paper_efficiency_pct",
               "model_base_efficiency_pct", "model_base_sync_s", "beyond"]].rename(columns={
        "rpis": "RPis", "paper_wall_s": "paper wall (s)", "model_table1_wall_s": "model, Table 1 compute (s)",
        "model_table1_error_pct": "error, Table 1 compute (%)", "model_base_wall_s": "model, np=2 compute (s)",
        "model_base_error_pct": "error, np=2 compute (%)", "paper_speedup": "paper S", "model_base_speedup": "model S",
        "paper_efficiency_pct": "paper E (%)", "model_base_efficiency_pct": "model E (%)",
        "model_base_sync_s": "model sync, 10 epochs (s)", "beyond": "paper minus model compute, per epoch (s)"})
    f1, f2 = "{:,.1f}", "{:+.1f}"
    fmt = {c: f1 for c in show.columns if "(s)" in c}
    fmt.update({"error, Table 1 compute (%)": f2, "error, np=2 compute (%)": f2, "paper S": "{:.2f}", "model S": "{:.2f}", "paper E (%)": "{:.1f}",
                "model E (%)": "{:.1f}"})
    m1, m2 = machines["model_table1"], machines["model_base"]
    net = m1.net
    mean_abs = lambda c: t2[c].abs().mean()  # noqa: E731
    lines = [
        "# The paper's Table 2: wall time predicted by labtools.perfmodel",
        "",
        "Strategy: the paper's epoch average (comm.gather to the root, average, comm.bcast; once per epoch), "
        f"{m1.ranks_per_node} ranks per RPi sharing its NIC, batch {m1.batch_per_rank} per rank, "
        f"{sc['weight_bytes']:,} bytes of weights ({sc['n_params']:,} float32). Network: the "
        f"{sc['settings']['emulated_2x1']['rate']} link measured between two emulated hosts (alpha = {1e6 * net.alpha_s:.1f} us, beta = {1e9 * net.beta_s_per_byte:.3f} ns/B "
        f"= {1e-6 / net.beta_s_per_byte:.1f} MB/s); within a node and pickling: this machine's (sync_costs.json).",
        "",
        f"- model, Table 1 compute: {m1.s_per_image * 1e3:.2f} ms per image per rank (Table 1's mean step at batch "
        f"{P.table1_row(RunConfig().batch_per_node)['batch_per_node']}/node over {m1.batch_per_rank} images per rank).",
        f"- model, np=2 compute: {m2.s_per_image * 1e3:.2f} ms per image per rank (Table 2's np = 2 wall time over "
        f"{P.images_per_rank(P.table2_base()['np']):,} images per rank x {P.table2_base()['epochs']} epochs): "
        f"its np = {P.table2_base()['np']} row is the calibration, error 0 by construction.",
        "- error = (model - paper) / paper. Speedup S and efficiency E as the paper defines them (base np = 2).",
        "",
        md_table(show, fmt),
        "",
        f"Mean |error|: Table 1 compute {mean_abs('model_table1_error_pct'):.1f} %, np = 2 compute "
        f"{mean_abs('model_base_error_pct'):.1f} % (np >= 4: "
        f"{t2.loc[t2['np'] > P.table2_base()['np'], 'model_base_error_pct'].abs().mean():.1f} %).",
        "",
        f"Reading: the weights' gather + bcast through the root's {sc['settings']['emulated_2x1']['rate']} NIC costs "
        "the model at most "
        f"{t2['model_base_sync_s'].max() / P.table2_base()['epochs']:.2f} s per epoch (np = {max(t2['np'])}), so with "
        "either calibration the model scales almost linearly. From np = 8 on, the paper's times exceed the "
        f"model's compute by {t2.loc[t2['np'] >= 8, 'beyond'].min():.0f}-{t2.loc[t2['np'] >= 8, 'beyond'].max():.0f} s "
        "per epoch: far more than moving the weights costs, so something the paper does not describe (or "
        "the compute rate its np = 2 row implies) is off; the Table 1 calibration, on the other hand, is "
        "slower than every row of Table 2.",
        "",
        "## Where the paper's numbers contradict each other",
        "",
        md_table(P.consistency(sc["weight_bytes"], net, RunConfig().batch_per_node, m1.ranks_per_node)[["check", "arithmetic"]]),
        "",
        "## Each sync strategy on the paper's cluster at np = 48 (np = 2 compute)",
        "",
    ]
    top = max(r["np"] for r in paper.TABLE2)
    at = curves[(curves["np"] == top) & (curves["calibration"] == "model_base")][
        ["strategy", "syncs_per_epoch", "compute_s", "sync_s", "wall_s", "speedup", "efficiency_pct"]]
    lines += [md_table(at.rename(columns={"compute_s": "compute, 10 epochs (s)", "sync_s": "sync, 10 epochs (s)",
                                          "wall_s": "wall (s)", "efficiency_pct": "efficiency (%)"}),
                       {"compute, 10 epochs (s)": f1, "sync, 10 epochs (s)": f1, "wall (s)": f1, "speedup": "{:.2f}",
                        "efficiency (%)": "{:.1f}"}), ""]
    at1 = curves[(curves["np"] == top) & (curves["calibration"] == "model_table1")]
    lines += [f"With Table 1 compute ({machines['model_table1'].s_per_image / machines['model_base'].s_per_image:.1f}x "
              "slower per image) the same strategies reach efficiency "
              f"{at1['efficiency_pct'].min():.1f}-{at1['efficiency_pct'].max():.1f} % at np = {top}.", ""]
    lines += time_to_accuracy_lines(tta, machines, sc, strategies, top)
    return "\n".join(lines) + "\n"


def time_to_accuracy_lines(tta, machines, sc, strategies, top) -> list[str]:
    rec = [s for s in strategies if s.sync == "allreduce" and s.impl == "ring"][0]
    lines = ["## Time to the paper's best accuracy at np = 48, recommended configuration", "",
             f"Recommended (labtools.profiles.RECOMMENDED, the selection study's choice): {profiles.RECOMMENDED!r}: "
             f"per-step Allreduce, timed here as ring ({rec.name}, +{100 * rec.compute_overhead:.1f} % compute for "
             f"the gradient packing). Target: the paper's best test accuracy, {tta['target_pct']} % (np = "
             f"{tta['target_np']}). Test accuracy per epoch: the recommended configuration's test runs in "
             f"results/selection-paper (np = {', '.join(map(str, tta['world']))}, {len(tta['run_ids'])} seeds; logical ranks on this "
             "machine compute what the ranks of a cluster would).", ""]
    curve = ", ".join(f"{100 * a:.2f}" for a in tta["mean_curve"])
    lines.append(f"Seed-mean test accuracy per epoch (%): {curve}.")
    seeds = ", ".join(f"{rid}: {e if e is not None else 'not reached'}" for rid, e in tta["per_seed"].items())
    lines.append(f"First epoch at or above the target, per seed: {seeds}.")
    if tta["epochs"] is None:
        lines.append("The seed-mean curve does not reach the target within the runs' epochs: no time is predicted.")
        return lines + [""]
    lines.append(f"The seed-mean curve reaches it after epoch {tta['epochs']} (of a {len(tta['mean_curve'])}-epoch "
                 "cosine schedule: stopping there is the 10-epoch run cut short, not a shorter schedule).")
    base = P.table2_base()
    for label, m in machines.items():
        e = P.epoch_time(rec, top, m, sc["weight_bytes"])
        lines.append(f"- {m.name}: {e['epoch_s']:.1f} s per epoch ({e['compute_s']:.1f} s compute + {e['sync_s']:.1f} s "
                     f"in {e['syncs']} Allreduces) -> {tta['epochs']} epochs = {tta['epochs'] * e['epoch_s']:,.0f} s "
                     f"(the paper's np = {base['np']} run took {base['wall_s']:,.0f} s to reach its "
                     f"{tta['target_pct']} %).")
    return lines + [""]


def here_markdown(coll, runs_df, emu, sc, ec) -> str:
    f3 = "{:.3f}"
    here_fit = sc["settings"]["here"]["fit"]
    lines = ["# The model against this machine's measurements", "",
             "error = (model - measured) / measured. Links: alpha, beta fitted to each setting's ping-pong "
             "(bench/results/sync_costs.json); every collective below is predicted from them, not fitted.", "",
             "## alpha, beta", ""]
    fits = []
    for name, st in sc["settings"].items():
        for pair, f in st["fit"].items():
            if pair.startswith("pingpong"):
                fits.append({"setting": name, "pair": pair, "alpha_us": 1e6 * f["alpha_s"],
                             "beta_ns_per_byte": 1e9 * f["beta_s_per_byte"], "MB_per_s": f["bandwidth_MB_s"]})
        fits.append({"setting": name, "pair": "pickling (extra per byte)", "alpha_us": float("nan"),
                     "beta_ns_per_byte": 1e9 * st["fit"]["pickle"]["s_per_byte"], "MB_per_s": float("nan")})
    import pandas as pd

    lines += [md_table(pd.DataFrame(fits), {"alpha_us": "{:.1f}", "beta_ns_per_byte": f3, "MB_per_s": "{:,.1f}"}), "",
              "pingpong_rank1: ranks 0 and 1 (two hosts when a host runs one process, one host otherwise); "
              "pingpong_last: rank 0 and the last rank (another host).", "",
              f"## Collectives of the weight vector ({sc['weight_bytes']:,} bytes)", "",
              md_table(coll.drop(columns=["bytes"]), {"measured_ms": f3, "model_ms": f3, "error_pct": "{:+.1f}",
                                                    "median_abs_error_pct_all_sizes": "{:.1f}"}), "",
              f"Median |error| at the weight vector: {coll['error_pct'].abs().median():.1f} %. emulated_2x2 runs "
              f"{sc['settings']['emulated_2x2']['p']} processes on {sc['cpu_count']} cores. The model has no term for "
              "the reduction arithmetic of an Allreduce, and MPICH does not run a ring at every p (at p = 3 it folds "
              "the odd rank in and out, which recursive doubling's extra exchanges approximate). Small messages "
              "(median over all sizes) are off more: between 8 KiB and 512 KiB the protocols change (eager, "
              "rendezvous) and tbf's burst lets 256 kB through at full speed.", "",
              "## labtools runs (records of the paper's configuration)", "",
              md_table(runs_df, {"measured_s": "{:.4f}", "model_s": "{:.4f}", "error_pct": "{:+.1f}"}), "",
              "Wall-time kinds of the records used: " + "; ".join(runs_df.attrs["kinds"]) + ".", "",
              f"The sync row: the model prices the bare pickled gather + bcast "
              f"({1e9 * here_fit['pickle']['s_per_byte']:.2f} ns/B of pickling); labtools' epoch average also stacks "
              "the weights, averages them, measures divergence (one more collective) and assigns them back.", "",
              f"## Emulated hosts (bench/results/emulated_cluster.json: {ec['limit_train']:,} images, "
              f"{ec['epochs']} epoch, {ec['processes_per_host']} processes per host)", "",
              md_table(emu, {c: "{:.3f}" for c in emu.columns if c.endswith("_s")} |
                       {c: "{:+.1f}" for c in emu.columns if c.endswith("_pct")} | {"loadavg_1m_before": "{:.1f}"}), "",
              "The sync error: the model prices the bare collective; labtools' average adds its bookkeeping (see the "
              "np = 2 sync row above), and this bench ran beside other work (loadavg_1m_before, on "
              f"{sc['cpu_count']} cores).", "",
              "Compute is calibrated on the np = 2 row and scaled by images per rank and processes per core. "
              "One epoch of a few hundred images per process is mostly the first epoch's graph tracing, which "
              "does not shrink with the shard: the epoch-time error measures that, not the network.", ""]
    return "\n".join(lines)


def _paper_line(ax, x, y):
    ax.plot(x, y, color=figures.PAPER, marker="s", ls="--", mfc="white", label=paper.PAPER_LABEL)


def _np_axis(ax, nps):
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(nps))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel(f"MPI processes np ({RunConfig().ranks_per_node} per RPi)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)


def figure(t2, curves, rate: str):
    """(a) Table 2: paper vs model, error per row; (b)-(d) Figures 11, 8, 9 per sync strategy."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    nps = [r["np"] for r in paper.TABLE2]
    base = P.table2_base()["np"]
    cur = curves[curves["calibration"] == "model_base"]
    with figures.style():
        fig = Figure(figsize=(13, 10.5), layout="constrained")
        (ax1, ax2), (ax3, ax4) = fig.subplots(2, 2)
        _paper_line(ax1, t2["np"], t2["paper_wall_s"])
        for label, color, dy in (("model_table1", "C1", 7), ("model_base", "C0", -13)):
            ax1.plot(t2["np"], t2[f"{label}_wall_s"], color=color, marker="o", label=f"model: {CAL[label]}")
            for x, y, e in zip(t2["np"], t2[f"{label}_wall_s"], t2[f"{label}_error_pct"]):
                ax1.annotate(f"{e:+.0f}%", (x, y), textcoords="offset points", xytext=(0, dy), ha="center",
                             fontsize=7, color=color)
        ax1.set_yscale("log")
        ax1.set_ylabel("wall time for 10 epochs (s)")
        ax1.set_title("Table 2 wall time, paper vs model (labels: error vs paper)\n"
                      f"epoch average (gather + bcast), {RunConfig().ranks_per_node} ranks per RPi, {rate} links")
        for i, (name, rows) in enumerate(cur.groupby("strategy", sort=False)):
            kw = dict(marker="o", ms=4, color=f"C{i % 10}", label=name)
            ax2.plot(rows["np"], rows["wall_s"], **kw)
            ax3.plot(rows["np"], rows["speedup"], **kw)
            ax4.plot(rows["np"], rows["efficiency_pct"], **kw)
        _paper_line(ax2, t2["np"], t2["paper_wall_s"])
        _paper_line(ax3, t2["np"], t2["paper_speedup"])
        _paper_line(ax4, t2["np"], t2["paper_efficiency_pct"])
        ax3.plot(nps, [n / base for n in nps], color="0.6", ls="-.", lw=1, label=f"ideal (np / {base})", zorder=0)
        ax4.axhline(100, color="0.6", ls="-.", lw=1, label="ideal (100 %)", zorder=0)
        ax2.set_yscale("log")
        ax2.set_ylabel("wall time for 10 epochs (s)")
        ax2.set_title("Predicted wall time per sync strategy (Figure 11)\ncompute from Table 2's np = 2")
        ax3.set_yscale("log", base=2)
        ax3.yaxis.set_major_formatter(ScalarFormatter())
        ax3.set_ylabel(f"speedup S = T(np={base}) / T(np)")
        ax3.set_title("Predicted speedup per sync strategy (Figure 8)\ncompute from Table 2's np = 2")
        ax4.set_ylabel(f"efficiency E = S / (np / {base}) (%)")
        ax4.set_title("Predicted efficiency per sync strategy (Figure 9)\ncompute from Table 2's np = 2")
        for ax in (ax1, ax2, ax3, ax4):
            _np_axis(ax, nps)
        for ax in (ax1, ax2):  # plain seconds at 1-2-5 steps, not 10^k
            ax.yaxis.set_major_locator(FixedLocator([m * 10 ** k for k in range(7) for m in (1, 2, 5)]))
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.margins(y=0.12)
    return fig


def write_all(out_dir: Path, results_root: str, bench_dir: Path = BENCH) -> list[Path]:
    data, inputs = load_inputs(bench_dir)
    sc = data["sync_costs"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t2, machines = table2_frame(sc)
    strategies = model_strategies(data["step_breakdown"])
    curves = strategy_curves(machines, strategies, sc["weight_bytes"])
    tta = recommended_to_target(results_root)
    assumptions = {"calibrations": {k: {"name": m.name, "s_per_image": m.s_per_image} for k, m in machines.items()},
                   "links": "nodes: emulated 1 Gbit/s fit; within a node and pickling: this machine's fit"}
    written = []
    csv = out_dir / "table2_model.csv"
    results.atomic_write_text(csv, t2.to_csv(index=False))
    md = out_dir / "table2_model.md"
    results.atomic_write_text(md, table2_markdown(t2, machines, sc, curves, tta, strategies))
    written += [csv, md, write_sidecar(out_dir, "table2_model", [csv.name, md.name], tta["run_ids"], inputs, assumptions)]
    sc_csv = out_dir / "scaling_strategies.csv"
    results.atomic_write_text(sc_csv, curves.to_csv(index=False))
    written += [sc_csv, write_sidecar(out_dir, "scaling_strategies", [sc_csv.name], [], inputs, assumptions)]
    fig_paths = figures.save_figure(figure(t2, curves, sc["settings"]["emulated_2x1"]["rate"]), out_dir, "fig_table2_model", run_ids=[])
    written += fig_paths[:2] + [write_sidecar(out_dir, "fig_table2_model", [p.name for p in fig_paths[:2]], [],
                                              inputs, assumptions)]
    coll = collectives_vs_model(sc)
    runs_df = runs_vs_model(sc, data["allreduce_overhead"], data["step_breakdown"], results_root)
    emu = emulated_vs_model(sc, data["emulated_cluster"])
    here = out_dir / "model_vs_here.md"
    results.atomic_write_text(here, here_markdown(coll, runs_df, emu, sc, data["emulated_cluster"]))
    written += [here, write_sidecar(out_dir, "model_vs_here", [here.name], runs_df.attrs["run_ids"], inputs)]
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "figures" / "perfmodel"))
    ap.add_argument("--results", default=str(ROOT / "results"), help="the run records (results store)")
    a = ap.parse_args()
    for p in write_all(Path(a.out), a.results):
        print(p)


if __name__ == "__main__":
    main()
