"""Figures a reviewer trusts at a glance: the rules of labtools.figures, checked on every figure function.

Each figure is built from small synthetic tables shaped like the real ones (the columns of the tables in
figures/paper/tables/ and of results.load_runs) and checked mechanically:
  - every axes that shows data has a title;
  - no twin axes (two axes drawn over the same area, or a y axis drawn on the right);
  - a label has one colour in every panel, and a colour does not mean one thing in one panel and
    another in the next;
  - the batch-sweep figure says how many steps one of its "epochs" is, and puts ours and the paper's
    values on the same axes.

LABTOOLS_FIGURES_MODULE=/path/to/figures.py runs the same checks against another version of the module,
e.g. the one before these rules: ``git show <commit>:labtools/figures.py > /tmp/old.py``.
"""
from __future__ import annotations

import importlib.util
import os
import re

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import Collection
from matplotlib.colors import to_hex
from matplotlib.container import BarContainer, ErrorbarContainer
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from labtools import paper, records, results
from labtools.notebook import Context
from labtools.profiles import COLLAPSE_VARIANTS, STRATEGIES, SWEEP_STEPS
from labtools.tables import TABLE1_METRICS


@pytest.fixture(scope="module")
def F():
    """labtools.figures, or the file LABTOOLS_FIGURES_MODULE names (loaded inside the labtools package)."""
    path = os.environ.get("LABTOOLS_FIGURES_MODULE")
    if not path:
        from labtools import figures

        return figures
    spec = importlib.util.spec_from_file_location("labtools._figures_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------ synthetic inputs shaped like the real ones

def table1(steps=SWEEP_STEPS, batches=(8, 16, 24, 32)):
    """Like tables.table1_batch_sweep: one row per batch/node, mean/std of TABLE1_METRICS over 3 seeds.
    Per-epoch overheads make avg epoch time a little more than steps x mean step, as in real records."""
    rows = []
    for b in batches:
        step = 0.004 + 0.0009 * b
        vals = {"avg_epoch_s": steps * step * 1.08, "avg_epoch_warm_s": steps * step * 1.02, "mean_step_s": step,
                "global_img_per_s": b / step, "end_to_end_img_per_s": 0.95 * b / step, "peak_rss_mb": 1000 + b,
                "cpu_pct": 99.0}
        row = {"batch_per_node": b, "batch_per_rank": b // 2, "world": 2, "processes": 2}
        for m in TABLE1_METRICS:
            row[f"{m}_mean"], row[f"{m}_std"] = vals[m], 0.05 * vals[m]
        rows.append({**row, "n_runs": 3, "seeds": "0,1,2"})
    t = pd.DataFrame(rows)
    t.attrs["run_ids"] = [f"sweep-b{b}-s{s}" for b in batches for s in range(3)]
    return t


LOGICAL = "not a cluster time: logical ranks (P<N)"


def table2():
    """Like tables.table2_scaling (cluster times at np 2 and 4 only) and table2_per_run."""
    nps, rows, per = [2, 4, 8, 16], [], []
    for n in nps:
        cluster = n <= 4
        wall = 400.0 / n ** 0.8
        rows.append({"np": n, "processes": str(min(n, 4)), "epochs": 10,
                     "test_acc_pct_mean": 50.0 - 2 * n, "test_acc_pct_std": 3.0,
                     "test_loss_mean": 1.4, "test_loss_std": 0.1, "mean_train_loss_mean": 1.5 + 0.02 * n,
                     "mean_train_loss_std": 0.05, "mean_train_acc_pct_mean": 48.0 - 2 * n,
                     "mean_train_acc_pct_std": 2.0, "wall_s_mean": wall, "wall_s_std": 5.0,
                     "n_timed": 3 if cluster else 0,
                     "speedup": 400.0 / 2 ** 0.8 / wall if cluster else np.nan, "speedup_std": 0.02 if cluster else np.nan,
                     "efficiency_pct": 100 * (400.0 / 2 ** 0.8 / wall) / (n / 2) if cluster else np.nan,
                     "efficiency_pct_std": 1.0 if cluster else np.nan, "base_np": 2, "collapsed": int(n == 16),
                     "at_chance": int(n == 16), "n_runs": 3, "seeds": "0,1,2",
                     "wall_time_kind": records.CLUSTER if cluster else LOGICAL})
        for s in range(3):
            chance = n == 16 and s == 0
            per.append({"np": n, "seed": s, "processes": min(n, 4), "test_acc_pct": 10.0 if chance else 50 - 2 * n + s,
                        "test_loss": 2.3026 if chance else 1.4, "mean_train_acc_pct": 10.0 if chance else 48 - 2 * n + s,
                        "mean_train_loss": 2.3026 if chance else 1.5, "collapsed": chance, "at_chance": chance,
                        "wall_s": wall + s, "wall_time_kind": records.CLUSTER if cluster else LOGICAL,
                        "experiment": "scaling-paper", "run_id": f"np{n}-s{s}"})
    t, p = pd.DataFrame(rows), pd.DataFrame(per)
    t.attrs["run_ids"] = list(p.run_id)
    return t, p


def strategy_table():
    """Like tables.strategy_table: one row per (strategy, np)."""
    rows = [{"strategy": k, "np": n, "test_acc_pct_mean": 60 - i * 5 - n / 4, "test_acc_pct_std": 2.0,
             "n_runs": 3, "collapsed": 0, "at_chance": 0}
            for i, k in enumerate(STRATEGIES) for n in (2, 8, 48)]
    t = pd.DataFrame(rows)
    t.attrs["run_ids"] = [f"{r['strategy']}-{r['np']}" for r in rows]
    return t


def curves():
    """{run_id: (strategy, epochs.csv of the run)} at one np, two seeds per strategy."""
    out = {}
    for i, k in enumerate(STRATEGIES):
        for s in range(2):
            e = np.arange(1, 6)
            out[f"np48-{i}-s{s}"] = (k, pd.DataFrame({
                "epoch": e, "test_acc": 0.1 + 0.05 * e * (i + 1) / 4, "dead_conv10_frac": np.clip(0.8 - 0.1 * e * i, 0, 1),
                "weight_divergence": 0.05 / e, "grad_norm": 1.0 + 0.3 * e * i}))
    return out


def collapse_runs(tmp_path):
    """Like load_runs of the collapse part (plus a variant column), each run with an epochs.csv on disk."""
    rows = []
    for v_i, v in enumerate(COLLAPSE_VARIANTS):
        for world in (1, 2):
            for s in range(2):
                collapsed = (v_i + s) % 3 == 0
                d = tmp_path / "collapse" / f"np{world}-v{v_i}-s{s}"
                e = np.arange(1, 6)
                results.write_csv(d / "epochs.csv", pd.DataFrame({
                    "epoch": e, "dead_conv10_frac": np.full(5, 0.9 if collapsed else 0.2),
                    "dead_relu_frac": np.full(5, 0.6 if collapsed else 0.3)}).to_dict("records"))
                rows.append({"run_id": d.name, "run_dir": str(d), "world": world, "collapsed": collapsed,
                             "at_chance": collapsed, "test_acc": 0.1 if collapsed else 0.4 + 0.05 * s,
                             "init_dead_conv10_frac": 0.1 * (v_i + 1), "init_dead_relu_frac": 0.2, "variant": v})
    return pd.DataFrame(rows)


def selection_tables():
    """Like SelectionStudy.val_table and test_table."""
    names = ["allreduce, sqrt lr, warmup 2, cosine, no final ReLU, no dropout", "allreduce",
             "epoch-average (paper)"]
    val = pd.DataFrame({"candidate": names, "val_acc_pct_mean": [61.6, 55.0, 10.0], "val_acc_pct_std": [1.5, 2.0, 0.0],
                        "n_runs": 3, "at_chance": [0, 0, 3], "collapsed": [0, 0, 3],
                        "val_acc_pct_seed0": [60.7, 54.0, 10.0], "val_acc_pct_seed1": [63.4, 57.0, 10.0],
                        "val_acc_pct_seed2": [60.8, 54.0, 10.0], "chosen": [True, False, False]})
    val.attrs["run_ids"] = ["v1", "v2", "v3"]
    test = pd.DataFrame({"candidate": names[:1], "test_acc_pct_mean": [63.7], "test_acc_pct_std": [0.4], "n_runs": [3],
                         "at_chance": [0], "collapsed": [0], "test_acc_pct_seed3": [63.6], "test_acc_pct_seed4": [63.3],
                         "test_acc_pct_seed5": [64.2], "np": [48]})
    test.attrs["run_ids"] = ["t1"]
    return val, test


def rank_epochs(world):
    """Like results.load_rank_epochs: one row per logical rank and epoch."""
    return pd.DataFrame([{"rank": r, "epoch": e, "train_loss": 2.3 - 0.1 * e - 0.01 * r, "train_acc": 0.1 + 0.05 * e,
                          "samples": 800} for r in range(world) for e in range(1, 4)])


def build(F, name, tmp_path):
    t2, per_run = table2()
    val, test = selection_tables()
    return {
        "fig_batch_sweep": lambda: F.fig_batch_sweep(table1()),
        "fig_batch_sweep_no_paper": lambda: F.fig_batch_sweep(table1(), with_paper=False),
        "fig_speedup": lambda: F.fig_speedup(t2, per_run),
        "fig_efficiency": lambda: F.fig_efficiency(t2, per_run),
        "fig_train_accuracy": lambda: F.fig_train_accuracy(t2, per_run),
        "fig_total_time": lambda: F.fig_total_time(t2, per_run),
        "fig_train_loss": lambda: F.fig_train_loss(t2, per_run),
        "fig_test_accuracy": lambda: F.fig_test_accuracy(t2, per_run),
        "fig_rank_epoch_log_np2": lambda: F.fig_rank_epoch_log(rank_epochs(2), 2, run_id="r2"),
        "fig_rank_epoch_log_np12": lambda: F.fig_rank_epoch_log(rank_epochs(12), 12, run_id="r12"),
        "fig_strategy_accuracy": lambda: F.fig_strategy_accuracy(strategy_table()),
        "fig_accuracy_vs_epoch": lambda: F.fig_accuracy_vs_epoch(curves(), 48),
        "fig_diagnostics": lambda: F.fig_diagnostics(curves(), 48),
        "fig_collapse_runs": lambda: F.fig_collapse_runs(collapse_runs(tmp_path), lambda r: r.variant),
        "fig_selection": lambda: F.fig_selection(val, test, 48),
    }[name]()


FIGURES = ["fig_batch_sweep", "fig_batch_sweep_no_paper", "fig_speedup", "fig_efficiency", "fig_train_accuracy",
           "fig_total_time", "fig_train_loss", "fig_test_accuracy", "fig_rank_epoch_log_np2", "fig_rank_epoch_log_np12",
           "fig_strategy_accuracy", "fig_accuracy_vs_epoch", "fig_diagnostics", "fig_collapse_runs", "fig_selection"]


def test_every_figure_function_is_checked(F):
    public = {n for n in dir(F) if n.startswith("fig_") and callable(getattr(F, n))}
    assert public <= {re.sub(r"_(no_paper|np\d+)$", "", n) for n in FIGURES}, "a figure function without checks"


# ------------------------------------------------------------------ the rules, mechanically

def _has_data(ax) -> bool:
    return bool(ax.lines or ax.collections or ax.patches or ax.images)


def _color(h) -> str | None:
    """The colour an artist shows in a legend (hollow markers: their edge)."""
    if isinstance(h, ErrorbarContainer):
        h = h.lines[0]
    if isinstance(h, BarContainer):
        h = h.patches[0]
    if isinstance(h, Line2D):
        return to_hex(h.get_color())
    if isinstance(h, Collection):
        fc = h.get_facecolor()
        if len(fc) and fc[0][3] > 0:
            return to_hex(fc[0])
        ec = h.get_edgecolor()
        return to_hex(ec[0]) if len(ec) else None
    if isinstance(h, Patch):
        return to_hex(h.get_facecolor())
    return None


def _labelled(ax) -> list[tuple[str, str]]:
    """(label, colour) of every labelled artist in one axes."""
    hs, ls = ax.get_legend_handles_labels()
    return [(lab, _color(h)) for h, lab in zip(hs, ls) if _color(h)]


def _text(fig) -> str:
    """Every piece of text a reader sees on the figure."""
    parts = [t.get_text() for t in fig.texts]
    parts.append(fig.get_suptitle())
    for leg in fig.legends:
        parts += [t.get_text() for t in leg.get_texts()]
    for ax in fig.axes:
        parts += [ax.get_title(loc) for loc in ("left", "center", "right")]
        parts += [ax.get_xlabel(), ax.get_ylabel()] + [t.get_text() for t in ax.texts]
        if ax.get_legend():
            parts += [t.get_text() for t in ax.get_legend().get_texts()]
    return "\n".join(parts)


def problems(fig) -> list[str]:
    out = []
    fig.draw_without_rendering()  # final positions (constrained layout)
    axes = [ax for ax in fig.axes if _has_data(ax)]
    for i, ax in enumerate(axes):
        if not any(ax.get_title(loc).strip() for loc in ("left", "center", "right")):
            out.append(f"panel {i} ({ax.get_ylabel()!r}) has no title")
    for i, a in enumerate(fig.axes):
        if a.yaxis.get_label_position() == "right" or a.yaxis.get_ticks_position() == "right":
            out.append(f"axes {i} ({a.get_ylabel()!r}) has its y axis on the right (a twin axis)")
        for j, b in enumerate(fig.axes[i + 1:], i + 1):
            if np.allclose(a.get_position().bounds, b.get_position().bounds):
                out.append(f"axes {i} and {j} are drawn over each other (twin axes: "
                           f"{a.get_ylabel()!r} / {b.get_ylabel()!r})")
    by_label, per_panel = {}, []
    for ax in axes:
        panel = {}
        for lab, c in _labelled(ax):
            by_label.setdefault(lab, set()).add(c)
            panel.setdefault(c, set()).add(lab)
        per_panel.append(panel)
    out += [f"label {lab!r} has colours {sorted(cs)}" for lab, cs in by_label.items() if len(cs) > 1]
    for i, p in enumerate(per_panel):
        for j, q in enumerate(per_panel[i + 1:], i + 1):
            for c in set(p) & set(q):
                if not p[c] & q[c]:
                    out.append(f"colour {c} means {sorted(p[c])} in panel {i} but {sorted(q[c])} in panel {j}")
    return out


@pytest.mark.parametrize("name", FIGURES)
def test_figure_keeps_the_rules(F, name, tmp_path):
    fig = build(F, name, tmp_path)
    assert [ax for ax in fig.axes if _has_data(ax)], "no data drawn"
    assert problems(fig) == []


# ------------------------------------------------------------------ the batch sweep (Figures 4-5)

def test_batch_sweep_says_what_an_epoch_is(F):
    text = _text(F.fig_batch_sweep(table1()))
    assert re.search(rf"\b{SWEEP_STEPS} (training )?steps\b", text), text
    assert "not a pass over" in text
    # told explicitly (a smoke profile's 10 steps): ours and the paper's step counts both stated
    text = _text(F.fig_batch_sweep(table1(steps=10), steps_per_epoch=10))
    assert re.search(r"\b10 (training )?steps\b", text) and re.search(r"paper \d+ steps|paper.*\b200\b", text), text
    # not told, and the data do not look like 200-step epochs: an estimate, marked as one
    text = _text(F.fig_batch_sweep(table1(steps=40)))
    assert re.search(r"≈4\d (training )?steps", text) and "estimated" in text, text
    # the table may carry it
    t = table1(steps=10)
    t.attrs["steps_per_epoch"] = 10
    assert re.search(r"\b10 (training )?steps\b", _text(F.fig_batch_sweep(t)))


def test_batch_sweep_compares_on_shared_axes(F):
    """Ours and the paper's values of one quantity are drawn in the same axes (one scale), never in an
    axes of their own."""
    fig = F.fig_batch_sweep(table1())
    with_paper = [ax for ax in fig.axes if any(lab == paper.PAPER_LABEL for lab, _ in _labelled(ax))]
    assert with_paper
    for ax in with_paper:
        labels = [lab for lab, _ in _labelled(ax)]
        assert any(lab.startswith("this machine") for lab in labels), f"{ax.get_ylabel()!r}: the paper alone"
    # the quantities compared: epoch time and throughput, each in absolute and relative form
    ylabels = " | ".join(ax.get_ylabel() for ax in with_paper)
    assert "epoch time" in ylabels and "throughput" in ylabels


def test_colours_come_from_one_mapping(F):
    """The named meanings keep their colour in every figure: red is at chance / collapsed only."""
    red = to_hex(F.COLORS["at_chance"])
    assert to_hex(F.COLORS["collapsed"]) == red
    assert red not in {to_hex(c) for c in F.STRATEGY_PALETTE} | {to_hex(c) for c in F.VARIANT_PALETTE}
    assert {to_hex(F._color(k)) for k in STRATEGIES} <= {to_hex(c) for c in F.STRATEGY_PALETTE}
    assert len({F._color(k) for k in STRATEGIES}) == len(STRATEGIES)


def test_collapse_figure_uses_one_colour_per_meaning(F, tmp_path):
    fig = F.fig_collapse_runs(collapse_runs(tmp_path), lambda r: r.variant)
    panels = [dict(_labelled(ax)) for ax in fig.axes]
    collapsed = {c for p in panels for lab, c in p.items() if lab.startswith("collapsed")}
    assert collapsed == {to_hex(F.COLORS["collapsed"])}
    variant_colours = {p[v] for p in panels for v in COLLAPSE_VARIANTS if v in p}
    assert len(variant_colours) == len(COLLAPSE_VARIANTS)
    assert not variant_colours & {to_hex(F.COLORS["collapsed"]), to_hex(F.COLORS["trained"])}


def test_save_figure_note_still_goes_on_the_first_title(F, tmp_path):
    """Context.save_figure appends the profile note to the first axes' title: that title must be a panel's."""
    ctx = Context("quick", "01_batch_sweep", out_dir=tmp_path / "out", results_root=tmp_path / "r", params={})
    fig = F.fig_batch_sweep(table1())
    first = fig.axes[0].get_title()
    assert first and _has_data(fig.axes[0])
    paths = ctx.save_figure(fig, "fig04_05_batch_sweep")
    assert fig.axes[0].get_title().startswith(first) and "reduced protocol" in fig.axes[0].get_title()
    assert paths[0].read_bytes()[:4] == b"\x89PNG"
