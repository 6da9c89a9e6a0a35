"""The paper's Figures 4-12 from our tables, with the paper's values overlaid for comparison.

Figures are built as matplotlib.figure.Figure objects, not through pyplot: they render with the Agg
(PNG) and PDF backends whatever backend a notebook has selected, and they are never kept alive by
pyplot's figure registry. One rcParams dict (STYLE) applies to all of them via style().

Rules every figure here keeps (tests/test_figures.py checks them):
- two quantities compared on one plot share one axis in a common unit (never twin axes scaled
  independently); otherwise they go in separate, separately titled panels;
- one colour per meaning, from COLORS (and the palettes below it), the same in every panel;
- every panel has a title;
- an "epoch" that is not a pass over the training data (the batch-size sweep's fixed step count)
  says so on the figure.
"""
from __future__ import annotations

import os
import tempfile
import textwrap
from contextlib import contextmanager
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, MaxNLocator, NullLocator, ScalarFormatter

from . import paper, results, tables
from .records import CLUSTER

STYLE = {
    "figure.figsize": (6.4, 4.8), "figure.dpi": 100, "savefig.dpi": 200, "savefig.bbox": "tight",
    "font.size": 10, "axes.titlesize": 10.5, "axes.labelsize": 10, "legend.fontsize": 8,
    "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
    "lines.linewidth": 1.6, "lines.markersize": 6, "errorbar.capsize": 3,
    "pdf.fonttype": 42,  # embed TrueType, so PDF text stays editable/searchable
}
# One colour per meaning, used by every figure and panel. Red is kept for "at chance / collapsed" only,
# so no strategy, variant or series colour is red.
COLORS = {
    "ours": "C0",  # a measurement on this machine
    "paper": "0.35",  # grey: the paper's values, the reference, not a measurement of ours
    "reference": "0.6",  # light grey: ideal lines, chance level
    "at_chance": "C3",  # a run at chance (collapsed or not)
    "collapsed": "C3",  # a run whose test loss collapsed to ln 10
    "trained": "C0",  # a run that trained
    "chosen": "C2",  # the candidate the selection rule chose
    "candidate": "0.75",  # the other candidates
    "validation_seed": "k",  # one selection seed's validation accuracy
    "test_seed": "C1",  # one fresh seed's test accuracy
    "mean": "k",  # the mean over ranks in a per-rank plot
    "key": "0.4",  # marker-shape keys (np = 1, np = 2): the shape means something, not the colour
}
OURS = COLORS["ours"]
PAPER = COLORS["paper"]
# Colours for named series (sync strategies, collapse variants): never red (C3), grey (C7) or the
# figure-specific meanings they are drawn beside (collapse variants skip the outcome colours).
STRATEGY_PALETTE = ("C0", "C1", "C2", "C4", "C5", "C6", "C8", "C9")
VARIANT_PALETTE = ("C1", "C2", "C4", "C5", "C6", "C8", "C9")
RUN_IDS_ATTR = "labtools_run_ids"  # figure attribute save_figure reads for the provenance sidecar


@contextmanager
def style():
    with matplotlib.rc_context(STYLE):
        yield


def _new(ncols=1, width=None):
    fig = Figure(figsize=(width or STYLE["figure.figsize"][0] * (1 if ncols == 1 else 0.85 * ncols),
                          STYLE["figure.figsize"][1]), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def _tag(fig, df):
    setattr(fig, RUN_IDS_ATTR, list(df.attrs.get("run_ids", [])))
    return fig


def _ours(ax, t2, col, timing, per_run=None, color=OURS):
    """Our mean ± std per np. Timing columns: filled where the time is a cluster's, hollow (dotted) where
    it is not, with a legend entry saying why. Accuracy/loss columns: each seed as a small dot too."""
    std = f"{col}_std" if f"{col}_std" in t2.columns else None
    mean = f"{col}_mean" if f"{col}_mean" in t2.columns else col
    n = f"n={t2['n_runs'].min()}" if t2["n_runs"].nunique() == 1 else f"n={t2['n_runs'].min()}-{t2['n_runs'].max()}"
    if not timing:
        ax.errorbar(t2["np"], t2[mean], yerr=t2[std] if std else None, color=color, marker="o", ls="-",
                    label=f"this machine (mean ± std over seeds, {n})")
        if per_run is not None and col in per_run:
            ok = ~per_run["at_chance"].astype(bool) if "at_chance" in per_run else per_run[col].notna()
            ax.scatter(per_run.loc[ok, "np"], per_run.loc[ok, col], s=14, color=color, alpha=0.45, zorder=3,
                       edgecolor="none", label="this machine, each seed")
            if (~ok).any():
                ax.scatter(per_run.loc[~ok, "np"], per_run.loc[~ok, col], s=22, color=COLORS["at_chance"], marker="x", zorder=3,
                           label="this machine, a seed at chance")
        return
    cl = t2[t2["wall_time_kind"] == CLUSTER]
    if len(cl):
        nt = f"n={cl['n_timed'].min()}" if cl["n_timed"].nunique() == 1 else f"n={cl['n_timed'].min()}-{cl['n_timed'].max()}"
        ax.errorbar(cl["np"], cl[mean], yerr=cl[std] if std else None, color=color, marker="o", ls="-",
                    label=f"this machine, cluster time (mean ± std, {nt})")
    rest = t2[t2["wall_time_kind"] != CLUSTER]
    if len(rest):
        nps = ", ".join(str(int(v)) for v in rest["np"])
        reasons = {k.split(": ", 1)[-1] for kinds in rest["wall_time_kind"] for k in kinds.split("; ")}
        why = textwrap.fill("; ".join(sorted(reasons)), 70, subsequent_indent="  ")
        if rest[mean].notna().any():
            ax.errorbar(rest["np"], rest[mean], yerr=rest[std] if std else None, color=color, marker="o", ls=":",
                        mfc="none", label=f"this machine, NOT a cluster time (np={nps}):\n  {why}")
        else:
            ax.plot([], [], color=color, marker="o", ls="none", mfc="none",
                    label=f"no value at np={nps}, not a cluster time:\n  {why}")


def _paper(ax, col):
    p = paper.table2()
    ax.plot(p["np"], p[col], color=PAPER, marker="s", ls="--", mfc="white", label=paper.PAPER_LABEL)


def _legend(ax, handles=None, labels=None):
    """Below the axes: the labels are long and would otherwise sit on the data."""
    args = (handles, labels) if handles is not None else ()
    ax.legend(*args, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)


def _np_axis(ax, t2, with_paper):
    nps = sorted(set(t2["np"]) | (set(paper.table2()["np"]) if with_paper else set()))
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(nps))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("MPI processes np (logical ranks N)")


def _vs_np(t2, col, paper_col, ylabel, title, timing, with_paper=True, logy=False, per_run=None):
    with style():
        fig, (ax,) = _new()
        if with_paper:
            _paper(ax, paper_col)
        _ours(ax, t2, col, timing, per_run)
        _np_axis(ax, t2, with_paper)
        if logy:
            ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        _legend(ax)
    return _tag(fig, t2), ax


# ------------------------------------------------------------------ Figures 8-12 (and test accuracy)

def fig_speedup(table2_df, per_run=None, with_paper=True):
    """Figure 8: speedup S vs np, with the ideal S = np / base np."""
    fig, ax = _vs_np(table2_df, "speedup", "speedup", "speedup S (T_base / T)",
                     "Speedup vs MPI processes (Figure 8)", timing=True, with_paper=with_paper,
                     per_run=per_run)
    with style():
        base = table2_df["base_np"].iloc[0]
        xs = sorted(set(ax.xaxis.get_major_locator().locs))
        ax.plot(xs, [x / base for x in xs], color=COLORS["reference"], ls="-.", lw=1, label=f"ideal (np / {base})", zorder=0)
        _legend(ax)
    return fig


def fig_efficiency(table2_df, per_run=None, with_paper=True):
    """Figure 9: parallel efficiency E vs np, 100 % = ideal."""
    fig, ax = _vs_np(table2_df, "efficiency_pct", "efficiency_pct", "efficiency E (%)",
                     "Parallel efficiency vs MPI processes (Figure 9)", timing=True, with_paper=with_paper,
                     per_run=per_run)
    with style():
        ax.axhline(100, color=COLORS["reference"], ls="-.", lw=1, zorder=0, label="ideal (100 %)")
        _legend(ax)
    return fig


def fig_train_accuracy(table2_df, per_run=None, with_paper=True):
    """Figure 10: mean train accuracy (final epoch, mean over ranks) vs np."""
    return _vs_np(table2_df, "mean_train_acc_pct", "mean_train_acc_pct", "mean train accuracy, final epoch (%)",
                  "Train accuracy vs MPI processes (Figure 10)", timing=False, with_paper=with_paper,
                  per_run=per_run)[0]


def fig_total_time(table2_df, per_run=None, with_paper=True):
    """Figure 11: total training wall time (slowest rank) vs np; log y, since the machines differ ~10x."""
    return _vs_np(table2_df, "wall_s", "wall_s", "total training wall time, slowest rank (s, log scale)",
                  "Total training time vs MPI processes (Figure 11)", timing=True, with_paper=with_paper, logy=True,
                  per_run=per_run)[0]


def fig_train_loss(table2_df, per_run=None, with_paper=True):
    """Figure 12: mean train loss (final epoch, mean over ranks) vs np."""
    return _vs_np(table2_df, "mean_train_loss", "mean_train_loss", "mean train loss, final epoch (cross-entropy)",
                  "Train loss vs MPI processes (Figure 12)", timing=False, with_paper=with_paper,
                  per_run=per_run)[0]


def fig_test_accuracy(table2_df, per_run=None, with_paper=True):
    """Final test accuracy vs np (Table 2's test column; the paper has no figure for it)."""
    return _vs_np(table2_df, "test_acc_pct", "test_acc_pct", "test accuracy, final epoch (%)",
                  "Test accuracy vs MPI processes", timing=False, with_paper=with_paper,
                  per_run=per_run)[0]


# ------------------------------------------------------------------ Figures 4-5 and 6-7

def _sweep_steps(table1_df, steps_per_epoch):
    """Steps per epoch of our sweep: as given, else the table's attrs, else profiles.SWEEP_STEPS when the
    data agree with it (avg epoch time / mean step, which counts per-epoch overheads, within 0.9-1.5x),
    else an estimate. Returns (steps, how it is known: "" or "≈")."""
    from .profiles import SWEEP_STEPS

    if steps_per_epoch is None:
        steps_per_epoch = table1_df.attrs.get("steps_per_epoch")
    if steps_per_epoch is not None:
        return int(steps_per_epoch), ""
    ratio = (table1_df["avg_epoch_s_mean"] / table1_df["mean_step_s_mean"]).median()
    if ratio == ratio and 0.9 * SWEEP_STEPS <= ratio <= 1.5 * SWEEP_STEPS:
        return SWEEP_STEPS, ""
    return (int(round(ratio)), "≈") if ratio == ratio else (None, "")


def _epoch_note(steps, approx, paper_steps, with_paper) -> str:
    """What an 'epoch' is in the fast sweep, for the figure (Table 1's epochs are not passes over the data)."""
    ours = (f"{approx}{steps} training steps" if steps else "a fixed number of training steps")
    if approx:
        ours += " (estimated: avg epoch time / mean step)"
    text = f"One 'epoch' of this fast sweep = {ours} at every batch size"
    if with_paper:
        if steps == paper_steps and not approx:
            text += f", here and in the paper (its Table 1: avg epoch time / mean step = {paper_steps})"
        else:
            text += f"; in the paper {paper_steps} steps (its Table 1: avg epoch time / mean step)"
    return text + ": steps × global batch images, not a pass over the 50,000 training images."


def fig_batch_sweep(table1_df, with_paper=True, steps_per_epoch=None):
    """Figures 4-5: avg epoch time and global throughput vs batch/node, ours and the paper's.

    Absolute levels differ ~100x between this machine and an RPi 4, and two y axes scaled
    independently would make any two curves meet at their ends. So each quantity gets one shared
    axis per row: top, absolute values on a log scale (equal ratios, equal heights); bottom, each
    series relative to its own value at the smallest batch (%), where the shapes (where the optimum
    lies) compare directly. ``steps_per_epoch``: the sweep's steps per "epoch" (default: see
    _sweep_steps), stated on the figure.
    """
    pt = paper.table1()
    paper_steps = int(round((pt["avg_epoch_s"] / pt["mean_step_s"]).median()))
    steps, approx = _sweep_steps(table1_df, steps_per_epoch)
    quantities = [("avg_epoch_s", "avg epoch time", "s", f"Avg epoch time (1 epoch = {approx}{steps} steps)"
                   if steps else "Avg epoch time (fixed-step epochs)"),
                  ("global_img_per_s", "global throughput", "img/s", "Global throughput")]
    xs = sorted(set(table1_df["batch_per_node"]) | (set(pt["batch_per_node"]) if with_paper else set()))
    groups = list(table1_df.groupby(["world", "processes"]))
    refs = {int(rows["batch_per_node"].min()) for _, rows in groups} | ({int(pt["batch_per_node"].min())} if with_paper else set())
    ref = f"batch {refs.pop()}/node" if len(refs) == 1 else "its smallest batch"
    with style():
        fig = Figure(figsize=(11, 8.6), layout="constrained")
        axes = fig.subplots(2, 2, sharex=True)
        for j, (col, what, unit, title) in enumerate(quantities):
            top, rel = axes[0, j], axes[1, j]
            for (n, p), rows in groups:
                rows = rows.sort_values("batch_per_node")
                nr = f"n={rows['n_runs'].min()}" if rows["n_runs"].nunique() == 1 else \
                    f"n={rows['n_runs'].min()}-{rows['n_runs'].max()}"
                label = f"this machine, N={n}, P={p} (mean ± std, {nr})"
                # rows timed beside other load (or otherwise not a cluster's): hollow points on a dotted line
                other = (rows["wall_time_kind"] != CLUSTER) if "wall_time_kind" in rows else rows["batch_per_node"] < 0
                ls = ":" if other.any() else "-"
                top.errorbar(rows["batch_per_node"], rows[f"{col}_mean"], yerr=rows[f"{col}_std"], color=OURS,
                             marker="none", ls=ls)
                base = rows[f"{col}_mean"].iloc[0]
                rel.plot(rows["batch_per_node"], 100 * rows[f"{col}_mean"] / base, color=OURS, ls=ls)
                for ax, y in ((top, rows[f"{col}_mean"]), (rel, 100 * rows[f"{col}_mean"] / base)):
                    if (~other).any():
                        ax.plot(rows["batch_per_node"][~other], y[~other], color=OURS, marker="o", ls="none",
                                label=label + ", cluster time" if other.any() else label)
                    if other.any():
                        reasons = sorted({k.split(": ", 1)[-1] for ks in rows.loc[other, "wall_time_kind"]
                                          for k in ks.split("; ")})
                        bs = ", ".join(str(int(b)) for b in rows.loc[other, "batch_per_node"])
                        ax.plot(rows["batch_per_node"][other], y[other], color=OURS, marker="o", mfc="none", ls="none",
                                label=f"this machine, N={n}, P={p} ({nr}), NOT a cluster time (batch {bs}): "
                                      + textwrap.fill("; ".join(reasons), 60))
            if with_paper:
                top.plot(pt["batch_per_node"], pt[col], color=PAPER, marker="s", ls="--", mfc="white",
                         label=paper.PAPER_LABEL)
                rel.plot(pt["batch_per_node"], 100 * pt[col] / pt[col].iloc[0], color=PAPER, marker="s", ls="--",
                         mfc="white", label=paper.PAPER_LABEL)
            top.set_yscale("log")
            top.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            top.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            top.yaxis.set_minor_locator(NullLocator())
            top.set_ylabel(f"{what} ({unit}, log scale)")
            top.set_title(f"{title}: absolute")
            rel.axhline(100, color=COLORS["reference"], lw=0.8, ls=":", zorder=0)
            rel.set_ylabel(f"{what}, % of the same machine's\nvalue at {ref}")
            rel.set_title(f"{title}: relative to {ref} (means)")
            rel.set_xlabel("batch per node (images)")
            rel.set_xticks(xs)
        handles, labels = axes[0, 0].get_legend_handles_labels()
        order = sorted(range(len(labels)), key=lambda i: labels[i] == paper.PAPER_LABEL)  # ours first
        handles, labels = [handles[i] for i in order], [labels[i] for i in order]
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 2), frameon=False)
        fig.suptitle("Batch-size sweep (the paper's Figures 4-5, Table 1): this machine and the paper on shared axes\n"
                     + textwrap.fill(_epoch_note(steps, approx, paper_steps, with_paper), 130),
                     fontsize=STYLE["axes.titlesize"])
    return _tag(fig, table1_df)


def fig_rank_epoch_log(rank_epochs_df, np, run_id=None):
    """Figures 6-7: each rank's train loss and accuracy per epoch for one run (the paper shows console logs)."""
    import matplotlib.cm as cm

    ranks = sorted(rank_epochs_df["rank"].unique())
    if len(ranks) != np:
        raise ValueError(f"rank_epochs_df has {len(ranks)} ranks but np={np}: is it the right run?")
    with style():
        fig, axes = _new(2)
        # viridis up to 0.85: its pale-yellow end is hard to see on white
        colors = cm.viridis([0.85 * i / max(len(ranks) - 1, 1) for i in range(len(ranks))])
        mean = rank_epochs_df.groupby("epoch")[["train_loss", "train_acc"]].mean()
        for ax, col, ylabel, scale in [(axes[0], "train_loss", "train loss (cross-entropy)", 1),
                                       (axes[1], "train_acc", "train accuracy (%)", 100)]:
            for c, r in zip(colors, ranks):
                d = rank_epochs_df[rank_epochs_df["rank"] == r].sort_values("epoch")
                ax.plot(d["epoch"], d[col] * scale, color=c, lw=1, marker=".", label=f"rank {r}")
            ax.plot(mean.index, mean[col] * scale, color=COLORS["mean"], lw=2.2, label="mean over ranks")
            ax.set_xlabel("epoch")
            ax.set_ylabel(ylabel)
            ax.xaxis.set_major_locator(FixedLocator(sorted(rank_epochs_df["epoch"].unique())))
            ax.set_title(f"Per-rank {ylabel.split(' (')[0]}, np = {np} (Figures 6-7)")
            if len(ranks) <= 8:
                ax.legend()
            else:  # a 48-entry legend hides the data; colour runs rank 0 (dark) to N-1 (green)
                ax.legend(handles=ax.lines[-1:], labels=[f"mean over ranks; colour: rank 0..{ranks[-1]}"])
    setattr(fig, RUN_IDS_ATTR, [run_id] if run_id else [])
    return fig


# ------------------------------------------------------------------ writing

def _atomic_savefig(fig, path: Path, fmt: str, **kw) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".{fmt}", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format=fmt, **kw)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_figure(fig, out_dir, name, provenance: dict | None = None, run_ids=None) -> list[Path]:
    """Write name.png, name.pdf and name.provenance.json (run ids default to those the figure came from)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png, pdf = out_dir / f"{name}.png", out_dir / f"{name}.pdf"
    with style():
        _atomic_savefig(fig, png, "png")
        _atomic_savefig(fig, pdf, "pdf", metadata={"CreationDate": None})  # no timestamp: same input, same bytes
    run_ids = list(run_ids if run_ids is not None else getattr(fig, RUN_IDS_ATTR, []))
    side = out_dir / f"{name}.provenance.json"
    results.write_json(side, tables.provenance_block(provenance, run_ids, name, [png.name, pdf.name]))
    return [png, pdf, side]


# ------------------------------------------------------------------ sync strategies (notebook 03)

def fig_strategy_accuracy(strategy_df, with_paper=True):
    """Test accuracy vs np for each sync strategy (mean ± std over seeds), the paper overlaid."""
    with style():
        fig, (ax,) = _new()
        if with_paper:
            _paper(ax, "test_acc_pct")
        for sync, rows in _in_strategy_order(strategy_df.groupby("strategy")):
            n = rows["n_runs"].max()
            ax.errorbar(rows["np"], rows["test_acc_pct_mean"], yerr=rows["test_acc_pct_std"], marker="o",
                        color=_color(sync), label=f"{sync} (this machine, mean ± std, n≤{n})")
        ax.axhline(10, color=COLORS["reference"], lw=0.8, ls=":", label="chance (10%)")
        _np_axis(ax, strategy_df, with_paper)
        ax.set_ylabel("test accuracy after the last epoch (%)")
        ax.set_title("Test accuracy vs np by sync strategy")
        _legend(ax)
    return _tag(fig, strategy_df)


def _order(name) -> int:
    from .profiles import STRATEGIES

    names = list(STRATEGIES)
    return names.index(name) if name in names else len(names) + sum(map(ord, str(name))) % 5


def _color(name) -> str:
    """One colour per named strategy in every figure (the order of profiles.STRATEGIES), never red:
    red means a run at chance (COLORS)."""
    return STRATEGY_PALETTE[_order(name) % len(STRATEGY_PALETTE)]


def _in_strategy_order(items):
    return sorted(items, key=lambda kv: (_order(kv[0]), str(kv[0])))


def _curves(curves):
    """{run_id: (sync, epochs_df)} -> {sync: [epochs_df, ...]}"""
    by = {}
    for _, (sync, ep) in sorted(curves.items()):
        by.setdefault(sync, []).append(ep)
    return by


def fig_accuracy_vs_epoch(curves, np_):
    """Test accuracy after each epoch at one np, one line per run, coloured by strategy."""
    with style():
        fig, (ax,) = _new()
        for sync, eps in _in_strategy_order(_curves(curves).items()):
            for j, ep in enumerate(eps):
                ax.plot(ep["epoch"], 100 * ep["test_acc"], marker="o", color=_color(sync), alpha=0.85,
                        label=sync if j == 0 else None)
        ax.axhline(10, color=COLORS["reference"], lw=0.8, ls=":", label="chance (10%)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"Test accuracy per epoch at np = {np_} (one line per seed)")
        _legend(ax)
    setattr(fig, RUN_IDS_ATTR, sorted(curves))
    return fig


def fig_diagnostics(curves, np_):
    """Why runs collapse or not: dead conv10 channels, weight divergence before averaging, gradient norm."""
    cols = [("dead_conv10_frac", "dead conv10 channels (fraction)", "Dead conv10 channels"),
            ("weight_divergence", "rank weight divergence before averaging\n(mean ‖w_r − w̄‖ / ‖w̄‖)",
             "Weight divergence before averaging"),
            ("grad_norm", "mean gradient norm", "Mean gradient norm")]
    with style():
        fig, axes = _new(ncols=3, width=13)
        for sync, eps in _in_strategy_order(_curves(curves).items()):
            for j, ep in enumerate(eps):
                for ax, (c, _, _) in zip(axes, cols):
                    if c in ep:
                        ax.plot(ep["epoch"], ep[c], marker="o", color=_color(sync), alpha=0.85,
                                label=sync if j == 0 else None)
        for ax, (_, label, title) in zip(axes, cols):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("epoch")
            ax.set_ylabel(label)
            ax.set_title(f"{title} per epoch")
        fig.suptitle(f"Diagnostics at np = {np_}: one line per seed, coloured by sync strategy",
                     fontsize=STYLE["axes.titlesize"])
        _legend(axes[1])
    setattr(fig, RUN_IDS_ATTR, sorted(curves))
    return fig


def _variant_colors(variants) -> dict:
    """One colour per collapse variant (the order of profiles.COLLAPSE_VARIANTS), never an outcome colour."""
    from .profiles import COLLAPSE_VARIANTS

    known = list(COLLAPSE_VARIANTS)
    order = sorted(variants, key=lambda v: (known.index(v) if v in known else len(known), str(v)))
    return {v: VARIANT_PALETTE[i % len(VARIANT_PALETTE)] for i, v in enumerate(order)}


def fig_collapse_runs(runs_df, variant_of):
    """The collapse run by run: dead conv10 channels and dead ReLU channels below conv10 from
    initialisation (epoch 0) to the end (without the final ReLU, a collapse shows in the layers
    below), and final test accuracy against the conv10 fraction dead at initialisation.
    ``variant_of(row)`` names a run's option set. Records made before the init probe lack epoch 0.

    Colours: red = collapsed and blue = trained in every panel (in the third, a red ring marks a
    collapsed run); the option sets have colours of their own, neither red nor blue."""
    outcome = {True: ("collapsed (test loss ln 10)", COLORS["collapsed"]), False: ("trained", COLORS["trained"])}
    with style():
        fig, (a0, ab, a1) = _new(ncols=3, width=15)
        variants = list(_variant_colors({variant_of(r) for r in runs_df.itertuples()}))
        colors = _variant_colors(variants)
        for r in runs_df.sort_values("run_id").itertuples():
            ep = results.load_epochs(r.run_dir)
            c = outcome[bool(r.collapsed)][1]
            for ax, col in ((a0, "dead_conv10_frac"), (ab, "dead_relu_frac")):
                x, y = list(ep["epoch"]), list(ep[col])
                start = getattr(r, f"init_{col}", float("nan"))
                if start == start:  # not NaN
                    x, y = [0] + x, [start] + y
                ax.plot(x, y, color=c, alpha=0.6, marker="o", ms=3)
            # fractions come in steps of 0.1: offset each variant a little so equal points stay visible
            v = variant_of(r)
            dx = 0.012 * (variants.index(v) - (len(variants) - 1) / 2)
            a1.scatter(getattr(r, "init_dead_conv10_frac", float("nan")) + dx, 100 * r.test_acc, color=colors[v],
                       marker="o" if r.world == 1 else "s", s=44, alpha=0.85, zorder=3,
                       edgecolor=COLORS["collapsed"] if r.collapsed else "none", linewidths=0.9 if r.collapsed else 0)
        for ax in (a0, ab):
            for collapsed in (True, False):
                label, c = outcome[collapsed]
                ax.plot([], [], color=c, label=label)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("epoch (0 = initialisation)")
            ax.set_ylim(-0.03, 1.03)
        a0.set_ylabel("dead conv10 channels (fraction of 10, probe batch)")
        a0.set_title("Dead conv10 channels per epoch, one line per run")
        ab.set_ylabel("dead ReLU channels below conv10 (fraction)")
        ab.set_title("Dead ReLU channels below conv10 per epoch, one line per run")
        _legend(a0)
        for v in variants:
            a1.scatter([], [], color=colors[v], label=str(v))
        for n, m in ((1, "o"), (2, "s")):
            if (runs_df.world == n).any():
                a1.scatter([], [], color=COLORS["key"], marker=m, label=f"np = {n}")
        if runs_df.collapsed.astype(bool).any():
            a1.scatter([], [], facecolor="none", edgecolor=COLORS["collapsed"], linewidths=0.9, s=44,
                       label=outcome[True][0])
        a1.axhline(10, color=COLORS["reference"], lw=0.8, ls=":", label="chance (10%)")
        a1.set_xlim(-0.06, 1.06)
        a1.set_xlabel("dead conv10 channels at initialisation (fraction)")
        a1.set_ylabel("test accuracy after the last epoch (%)")
        a1.set_title("Outcome against the start, one point per run")
        _legend(a1)
    setattr(fig, RUN_IDS_ATTR, sorted(runs_df.run_id))
    return fig


# ------------------------------------------------------------------ selection (notebook 04)

def fig_selection(val_df, test_df=None, np_=48):
    """Validation accuracy of every candidate (each seed a dot, the mean a bar), the chosen one marked;
    beside it the winner's test accuracy on fresh seeds."""
    seed_cols = sorted(c for c in val_df.columns if c.startswith("val_acc_pct_seed"))
    with style():
        fig, (ax,) = _new(width=8)
        names = list(val_df["candidate"])
        ys = range(len(names))
        chosen = val_df["chosen"].astype(bool).tolist()
        for is_chosen, key, label in ((True, "chosen", "validation accuracy, mean over selection seeds: chosen by the rule"),
                                      (False, "candidate", "validation accuracy, mean over selection seeds: other candidates")):
            rows = [i for i in ys if chosen[i] == is_chosen]
            if rows:
                ax.barh(rows, val_df["val_acc_pct_mean"].iloc[rows], color=COLORS[key], label=label)
        for c in seed_cols:
            ax.scatter(val_df[c], list(ys), color=COLORS["validation_seed"], s=14, zorder=3)
        ax.scatter([], [], color=COLORS["validation_seed"], s=14, label="each selection seed (validation)")
        if test_df is not None and len(test_df):
            t_cols = sorted(c for c in test_df.columns if c.startswith("test_acc_pct_seed"))
            y = names.index(test_df["candidate"].iloc[0])
            for c in t_cols:
                ax.scatter(test_df[c], [y - 0.3], color=COLORS["test_seed"], marker="D", s=22, zorder=4)
            ax.scatter([], [], color=COLORS["test_seed"], marker="D", s=22,
                       label="the chosen one: each fresh seed on the test set")
        ax.axvline(10, color=COLORS["reference"], lw=0.8, ls=":", label="chance (10%)")
        ax.set_yticks(list(ys), [textwrap.fill(n, 38) for n in names], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("accuracy after the last epoch (%)")
        ax.set_title(f"Selection at np = {np_}: validation only, then the test set on fresh seeds")
        _legend(ax)
    ids = list(val_df.attrs.get("run_ids", [])) + (list(test_df.attrs.get("run_ids", [])) if test_df is not None else [])
    setattr(fig, RUN_IDS_ATTR, ids)
    return fig
