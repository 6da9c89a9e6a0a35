"""The paper's Tables 1 and 2, rebuilt from our raw run records (never from typed numbers).

Inputs are what labtools.results loads: ``load_runs`` (one row per completed run) and, for Table 1,
each run's ``load_rank_epochs``. Outputs are DataFrames with one row per configuration, the
repeats (seeds) aggregated as mean and sample std, and ``df.attrs["run_ids"]`` naming every run
used so save_table can record it.
"""
from __future__ import annotations

import math
from pathlib import Path

from . import metrics, records, results
from . import provenance as _prov

TABLE1_METRICS = ["avg_epoch_s", "avg_epoch_warm_s", "mean_step_s", "global_img_per_s", "end_to_end_img_per_s",
                  "peak_rss_mb", "cpu_pct"]
TABLE2_METRICS = ["test_acc_pct", "test_loss", "mean_train_loss", "mean_train_acc_pct"]

# Notes printed under each table (in the .md) and kept in its sidecar: every definition it uses.
TABLE1_NOTES = [
    "avg epoch time: mean over all epochs (the first included, as in the paper) of the epoch's wall time, "
    "slowest process.",
    "avg epoch time, epochs 2+: the same without epoch 1, which includes tracing the step functions "
    "(not in the paper; shown separately).",
    "mean step: mean over every rank and epoch of epoch seconds / steps.",
    "global throughput: global batch (batch/node x nodes) / mean step, the paper's column (24 / 1.205 s = 19.92 img/s).",
    "end-to-end throughput: all images of an epoch / its wall time, mean over epochs (includes per-epoch overheads).",
    "peak RSS: the highest resident set size of any process over the whole run (sampled every 0.2 s), as the paper defines it.",
    "avg process CPU: process CPU time / wall time per epoch (100 % = one core), mean over processes and epochs.",
    "mean ± sample std over the n runs (seeds) of each row: its cluster-valid timings (one process per rank, no "
    "more processes than cores, no other load); a row without any pools all its runs and says why they are not "
    "a cluster's in 'wall time kind'.",
]
TABLE2_NOTES = [
    "Accuracy and loss: after the last epoch; mean ± sample std over the n runs (seeds) of each np. Runs with the same "
    "science (N, config, seed) compute the same numbers whatever number of processes P hosts the N ranks "
    "(tests/test_equivalence.py, tests/test_training_mpi.py), so a row pools runs of any P; 'processes P' lists them.",
    "collapsed: test loss within 1e-3 of ln 10 = 2.3026 (the paper's criterion). at chance: collapsed, or test "
    "accuracy <= 11 % (labtools.metrics.is_at_chance).",
    "wall time: total training time of the slowest process (test evaluation excluded), mean over the runs "
    "that are timed as a cluster would be (one process per rank, no more processes than cores on any host). "
    "A row without such runs shows the mean of its runs and says why in 'wall time kind'.",
    "speedup S = T(base np) / T(np) and efficiency E = S / (np / base np), from cluster times only; "
    "blank where either time is not a cluster's (the reason is in 'wall time kind').",
]
SEED_NOTE = "One row per run: every seed behind the table above."
CLUSTER = records.CLUSTER

# Config fields that may differ between runs pooled in one table row set: they change neither what is
# computed nor how fast (np and seed vary by design). Any other difference means mixed protocols.
_FREE = {"np", "seed", "out", "experiment", "run_id", "label", "quiet", "cifar_dir", "eval_batch", "save_weights"}

# Headers and decimals for the .md/.tex views (the .csv keeps raw names and full precision).
LABELS = {
    "np": "np (N)", "world": "N", "processes": "processes P", "epochs": "epochs",
    "batch_per_node": "batch/node", "batch_per_rank": "batch/rank",
    "avg_epoch_s": "avg epoch time (s)", "mean_step_s": "mean step (s)",
    "global_img_per_s": "global throughput (img/s)", "peak_rss_mb": "peak RSS (MB)",
    "cpu_pct": "avg process CPU (%)", "test_acc_pct": "test acc (%)", "test_loss": "test loss",
    "mean_train_loss": "mean train loss", "mean_train_acc_pct": "mean train acc (%)",
    "wall_s": "wall time, slowest rank (s)", "speedup": "speedup S", "efficiency_pct": "efficiency E (%)",
    "base_np": "base np", "collapsed": "collapsed runs", "n_runs": "n runs", "wall_time_kind": "wall time kind",
    "at_chance": "runs at chance", "avg_epoch_warm_s": "avg epoch time, epochs 2+ (s)", "seeds": "seeds",
    "end_to_end_img_per_s": "end-to-end throughput (img/s)", "n_timed": "n cluster-timed runs", "seed": "seed",
    "run_id": "run id", "wall_s": "wall time, slowest rank (s)", "val_acc_pct": "validation acc (%)",
    "val_loss": "validation loss", "chosen": "chosen by the rule", "experiment": "experiment",
    "paper_test_acc_pct": "paper test acc (%)", "paper_test_loss": "paper test loss",
}
DECIMALS = {"val_acc_pct": 2, "val_loss": 4, "avg_epoch_s": 2, "avg_epoch_warm_s": 2, "end_to_end_img_per_s": 1, "mean_step_s": 4, "global_img_per_s": 1, "peak_rss_mb": 1, "cpu_pct": 1,
            "test_acc_pct": 2, "test_loss": 4, "mean_train_loss": 4, "mean_train_acc_pct": 2, "wall_s": 2,
            "speedup": 3, "efficiency_pct": 2, "paper_test_acc_pct": 2, "paper_test_loss": 4}


def _check_one_protocol(runs, vary=()):
    """Refuse to pool runs whose settings differ beyond np/seed (and `vary`): the mean would mix protocols."""
    if runs.empty:
        raise ValueError("no completed runs given")
    free = _FREE | set(vary)
    cols = [c for c in runs.columns if c.startswith("cfg_") and c[4:] not in free]
    mixed = [c for c in cols if runs[c].astype(str).nunique() > 1]  # astype(str): None/NaN/lists compare
    if mixed:
        raise ValueError(f"runs differ in {', '.join(mixed)}; filter runs_df to one protocol first")


def load_rank_epochs_by_run(runs_df) -> dict:
    """{run_id: that run's per-rank epoch rows}, the second input of table1_batch_sweep."""
    return {r.run_id: results.load_rank_epochs(r.run_dir) for r in runs_df.itertuples()}


def _run_timing(rk, batch_per_node: int, nodes: int) -> dict:
    """Table 1 quantities for one run from its per-rank epoch rows (definitions: TABLE1_NOTES).

    RSS and CPU are per process, and logical ranks in one process repeat them, so they count once
    per process.
    """
    per_epoch = rk.groupby("epoch").agg(samples=("samples", "sum"), wall=("process_epoch_s", "max"))
    warm = per_epoch[per_epoch.index > 1] if len(per_epoch) > 1 else per_epoch
    proc = rk.drop_duplicates(["process", "epoch"])
    step = rk["mean_step_s"].mean()
    return {"avg_epoch_s": per_epoch["wall"].mean(), "avg_epoch_warm_s": warm["wall"].mean(), "mean_step_s": step,
            "global_img_per_s": batch_per_node * nodes / step,
            "end_to_end_img_per_s": (per_epoch["samples"] / per_epoch["wall"]).mean(),
            "peak_rss_mb": proc["peak_rss_mb"].max(), "cpu_pct": proc["cpu_pct"].mean()}


def _table1_rows(runs_df, rank_epochs_by_run):
    import pandas as pd

    rows = []
    for r in runs_df.itertuples():
        if r.run_id not in rank_epochs_by_run:
            raise KeyError(f"no rank epochs for run {r.run_id}")
        nodes = r.world // r.cfg_ranks_per_node
        rows.append({"batch_per_node": r.cfg_batch_per_node, "batch_per_rank": r.cfg_batch_per_node // r.cfg_ranks_per_node,
                     "world": r.world, "processes": r.processes, "seed": r.cfg_seed, "run_id": r.run_id,
                     "wall_time_kind": r.wall_time_kind,
                     **_run_timing(rank_epochs_by_run[r.run_id], r.cfg_batch_per_node, nodes)})
    return pd.DataFrame(rows)


def table1_batch_sweep(runs_df, rank_epochs_by_run):
    """Paper Table 1 from our runs: one row per batch/node, repeats aggregated (definitions: TABLE1_NOTES).

    A Table 1 row is a measurement of time and memory: it pools the row's cluster-valid timings; a row
    without any pools all its runs and names why they are not a cluster's (wall_time_kind), so a
    machine that was busy still gets its table, labelled, instead of a rerun.
    rank_epochs_by_run maps run_id -> load_rank_epochs(run_dir) (see load_rank_epochs_by_run).
    """
    _check_one_protocol(runs_df, vary={"batch_per_node", "limit_train"})  # fixed steps per epoch
    rows = _table1_rows(runs_df, rank_epochs_by_run)
    has_cluster = rows.groupby("batch_per_node")["wall_time_kind"].transform(lambda k: (k == CLUSTER).any())
    rows = rows[(rows["wall_time_kind"] == CLUSTER) | ~has_cluster]
    t = metrics.aggregate(rows, ["batch_per_node", "batch_per_rank", "world", "processes"], TABLE1_METRICS)
    g = rows.groupby("batch_per_node")
    t = t.merge(g["seed"].agg(lambda s: ",".join(map(str, sorted(s)))).rename("seeds").reset_index(), on="batch_per_node")
    t = t.merge(g["wall_time_kind"].agg(lambda s: "; ".join(sorted(set(s)))).reset_index(), on="batch_per_node")
    t.attrs["run_ids"] = sorted(rows["run_id"])
    t.attrs["notes"] = TABLE1_NOTES
    return t


def table1_per_run(runs_df, rank_epochs_by_run=None):
    """Table 1's quantities for every run (seed) separately."""
    rows = _table1_rows(runs_df, rank_epochs_by_run or load_rank_epochs_by_run(runs_df))
    rows = rows.sort_values(["batch_per_node", "seed"]).reset_index(drop=True)
    rows.attrs["run_ids"] = sorted(runs_df["run_id"])
    rows.attrs["notes"] = [SEED_NOTE] + TABLE1_NOTES
    return rows


def _outcomes(runs_df):
    return runs_df.assign(np=runs_df["world"], test_acc_pct=100 * runs_df["test_acc"],
                          mean_train_acc_pct=100 * runs_df["mean_train_acc"], wall_s=runs_df["global_wall_s"],
                          collapsed=runs_df["collapsed"].astype(bool), at_chance=runs_df["at_chance"].astype(bool))


def table2_scaling(runs_df, base_np=2):
    """Paper Table 2 from our runs: one row per np, every seed pooled whatever P ran it (definitions:
    TABLE2_NOTES). Wall time, speedup and efficiency come from cluster-valid runs only."""
    import numpy as np
    import pandas as pd

    _check_one_protocol(runs_df)
    r = _outcomes(runs_df)
    t = metrics.aggregate(r, "np", TABLE2_METRICS)
    g = r.groupby("np")
    extra = g.agg(epochs=("epochs", "first"), collapsed=("collapsed", "sum"), at_chance=("at_chance", "sum"))
    extra["seeds"] = g["cfg_seed"].agg(lambda s: ",".join(map(str, sorted(s))))
    extra["processes"] = g["processes"].agg(lambda s: ",".join(map(str, sorted(set(s)))))
    t = t.merge(extra.reset_index(), on="np")
    timed = r[r["wall_time_kind"] == CLUSTER]
    wall = metrics.aggregate(timed, "np", ["wall_s"]).rename(columns={"n_runs": "n_timed"}) if len(timed) else \
        pd.DataFrame(columns=["np", "wall_s_mean", "wall_s_std", "n_timed"])
    t = t.merge(wall, on="np", how="left")
    t["n_timed"] = t["n_timed"].fillna(0).astype(int)
    # Rows with no cluster-valid run: the mean of what was run, and the kinds that say why it is not a cluster time.
    other = metrics.aggregate(r, "np", ["wall_s"]).set_index("np")
    kinds = g["wall_time_kind"].agg(lambda s: "; ".join(sorted(set(s))))
    no_cluster = t["n_timed"] == 0
    t.loc[no_cluster, "wall_s_mean"] = t.loc[no_cluster, "np"].map(other["wall_s_mean"]).to_numpy()
    t.loc[no_cluster, "wall_s_std"] = t.loc[no_cluster, "np"].map(other["wall_s_std"]).to_numpy()
    t["wall_time_kind"] = np.where(no_cluster, t["np"].map(kinds), CLUSTER)
    t["speedup"] = t["speedup_std"] = t["efficiency_pct"] = t["efficiency_pct_std"] = np.nan
    t["base_np"] = base_np
    base = t[(t["np"] == base_np) & ~no_cluster]
    if len(base):
        b = base.iloc[0]
        ok = ~no_cluster
        t.loc[ok, "speedup"] = metrics.speedup(b["wall_s_mean"], t.loc[ok, "wall_s_mean"])
        t.loc[ok, "efficiency_pct"] = metrics.efficiency(t.loc[ok, "speedup"], t.loc[ok, "np"], base_np)
        # Spread of a ratio of independent means, first order: relative stds add in quadrature; the base is S = 1.
        rel = np.sqrt((b["wall_s_std"] / b["wall_s_mean"]) ** 2 + (t["wall_s_std"] / t["wall_s_mean"]) ** 2)
        is_base = t["np"] == base_np
        t.loc[ok, "speedup_std"] = np.where(is_base[ok], 0.0, (t["speedup"] * rel)[ok])
        t.loc[ok, "efficiency_pct_std"] = np.where(is_base[ok], 0.0, (t["efficiency_pct"] * rel)[ok])
    cols = (["np", "processes", "epochs"] + [f"{m}_{s}" for m in TABLE2_METRICS for s in ("mean", "std")]
            + ["wall_s_mean", "wall_s_std", "n_timed", "speedup", "speedup_std", "efficiency_pct", "efficiency_pct_std",
               "base_np", "collapsed", "at_chance", "n_runs", "seeds", "wall_time_kind"])
    t = t[cols].sort_values("np").reset_index(drop=True)
    t.attrs["run_ids"] = sorted(runs_df["run_id"])
    t.attrs["notes"] = TABLE2_NOTES
    return t


def table2_per_run(runs_df):
    """Every run behind Table 2: np, seed, P, outcome, wall time and what kind of time it is."""
    r = _outcomes(runs_df).assign(seed=runs_df["cfg_seed"])
    cols = ["np", "seed", "processes", "test_acc_pct", "test_loss", "mean_train_acc_pct", "mean_train_loss",
            "collapsed", "at_chance", "wall_s", "wall_time_kind", "experiment", "run_id"]
    t = r[cols].sort_values(["np", "seed"]).reset_index(drop=True)
    t.attrs["run_ids"] = sorted(runs_df["run_id"])
    t.attrs["notes"] = [SEED_NOTE] + TABLE2_NOTES[1:3]
    return t


# ------------------------------------------------------------------ writing

def _fmt(x, decimals=None) -> str:
    if isinstance(x, float):
        if math.isnan(x):
            return ""
        return f"{x:.{decimals}f}" if decimals is not None else f"{x:.4g}"
    return str(x)


def display_frame(df):
    """Human view: each <m>_mean/<m>_std pair becomes one 'mean ± std' column (mean alone for one repeat)."""
    import pandas as pd

    out = {}
    for c in df.columns:
        if c.endswith("_std") and (c[:-4] + "_mean" in df.columns or c[:-4] in df.columns):
            continue  # printed with its mean
        base = c[:-5] if c.endswith("_mean") else c
        d = DECIMALS.get(base)
        if "_pct_seed" in c:  # one column per seed: "val acc, seed 3 (%)"
            what, seed = c.split("_pct_seed")
            out[f"{LABELS.get(what + '_pct', what).replace(' (%)', '')}, seed {seed} (%)"] = [_fmt(v, 2) for v in df[c]]
            continue
        std_col = base + "_std"
        if std_col in df.columns:
            out[LABELS.get(base, base)] = [
                _fmt(m, d) + ("" if isinstance(s, float) and math.isnan(s) else f" ± {_fmt(s, d)}")
                for m, s in zip(df[c], df[std_col])]
        else:
            out[LABELS.get(base, base)] = [_fmt(v, d) for v in df[c]]
    return pd.DataFrame(out)


def _markdown(df) -> str:
    """Fallback for DataFrame.to_markdown, which needs the optional 'tabulate' package."""
    cell = lambda v: str(v).replace("|", r"\|")
    lines = ["| " + " | ".join(cell(c) for c in df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
        "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}"}


def _tex_escape(s) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(s))  # one pass, so replacements are never re-escaped


def _latex(df) -> str:
    """Fallback for DataFrame.to_latex, which needs the optional 'jinja2' package."""
    lines = [r"\begin{tabular}{" + "l" * len(df.columns) + "}", r"\toprule",
             " & ".join(_tex_escape(c) for c in df.columns) + r" \\", r"\midrule"]
    lines += [" & ".join(_tex_escape(v) for v in row) + r" \\" for row in df.itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def save_table(df, out_dir, name, provenance: dict | None = None, run_ids=None) -> list[Path]:
    """Write name.csv (raw), name.md and name.tex (mean ± std view) and name.provenance.json; return paths.

    run_ids defaults to df.attrs["run_ids"] (set by the table builders), so the sidecar says which
    run records every number came from.
    """
    out_dir = Path(out_dir)
    view = display_frame(df)
    try:
        md = view.to_markdown(index=False)
    except ImportError:
        md = _markdown(view)
    try:
        tex = view.to_latex(index=False, escape=True)
    except ImportError:
        tex = _latex(view)
    # '±' and '<' are not safe in every LaTeX text font encoding; math mode is.
    tex = tex.replace("±", r"$\pm$").replace("<", r"$<$")
    paths = {"csv": out_dir / f"{name}.csv", "md": out_dir / f"{name}.md", "tex": out_dir / f"{name}.tex"}
    results.atomic_write_text(paths["csv"], df.to_csv(index=False))
    notes = list(df.attrs.get("notes", []))
    if notes:
        md += "\n\n" + "\n".join(f"- {n}" for n in notes)
    results.atomic_write_text(paths["md"], md + "\n")
    results.atomic_write_text(paths["tex"], tex)
    run_ids = list(run_ids if run_ids is not None else df.attrs.get("run_ids", []))
    side = out_dir / f"{name}.provenance.json"
    results.write_json(side, provenance_block({**(provenance or {}), **({"notes": notes} if notes else {})}, run_ids,
                                              name, [p.name for p in paths.values()]))
    return [*paths.values(), side]


def provenance_block(extra: dict | None, run_ids, name, files) -> dict:
    """sidecar() facts plus the caller's fields, the run ids used and the files described."""
    return _prov.sidecar(**{**(extra or {}), "name": name, "files": files, "run_ids": list(run_ids),
                                 "n_runs": len(run_ids)})


def strategy_table(runs_df, strategy):
    """Sync strategies against np: test accuracy and loss (mean ± std over seeds), collapsed runs,
    dead conv10 channels at the end. ``strategy`` names each run's strategy (a Series or list
    aligned with runs_df); runs may differ only in the strategy options, np and seed."""
    from .profiles import STRATEGY_FIELDS

    _check_one_protocol(runs_df, vary=set(STRATEGY_FIELDS))
    r = _outcomes(runs_df).assign(strategy=list(strategy), dead_conv10=runs_df["dead_conv10_frac"].astype(float))
    keys = ["strategy", "np"]
    t = metrics.aggregate(r, keys, ["test_acc_pct", "test_loss", "mean_train_acc_pct", "dead_conv10", "wall_s"])
    g = r.groupby(keys)
    extra = g.agg(collapsed=("collapsed", "sum"), at_chance=("at_chance", "sum"))
    extra["processes"] = g["processes"].agg(lambda s: ",".join(map(str, sorted(set(s)))))
    extra["wall_time_kind"] = g["wall_time_kind"].agg(lambda s: "; ".join(sorted(set(s))))
    t = t.merge(extra.reset_index(), on=keys)
    t = t.sort_values(keys).reset_index(drop=True)
    t.attrs["run_ids"] = sorted(runs_df["run_id"])
    t.attrs["notes"] = [TABLE2_NOTES[0].split(";")[0] + ".", TABLE2_NOTES[1],
                        "wall time: slowest process, mean over seeds; 'wall time kind' says whether it is a cluster's."]
    return t


def strategy_vs_paper(strategy_df):
    """One strategy beside the paper's Table 2 test accuracy and loss. ``strategy_df`` is
    ``strategy_table`` of that strategy's runs alone, so its run_ids are exactly the runs shown.

    Every np of either side gets a row: an np we have not run shows blanks on our side (n runs 0),
    never an interpolated value."""
    from . import paper

    if strategy_df["strategy"].nunique() > 1:
        raise ValueError("strategy_vs_paper: pass the rows of one strategy, got "
                         + ", ".join(sorted(strategy_df["strategy"].unique())))
    ours = strategy_df[["np", "test_acc_pct_mean", "test_acc_pct_std", "test_loss_mean", "test_loss_std",
                        "n_runs", "collapsed", "at_chance"]]
    theirs = paper.table2()[["np", "test_acc_pct", "test_loss"]].rename(
        columns={"test_acc_pct": "paper_test_acc_pct", "test_loss": "paper_test_loss"})
    t = ours.merge(theirs, on="np", how="outer").sort_values("np").reset_index(drop=True)
    t[["n_runs", "collapsed", "at_chance"]] = t[["n_runs", "collapsed", "at_chance"]].fillna(0).astype(int)
    t.attrs["run_ids"] = list(strategy_df.attrs.get("run_ids", []))
    t.attrs["notes"] = list(strategy_df.attrs.get("notes", []))
    return t
