"""FIGURES/PROFILE/REPORT.md (and .html): the paper's Tables 1-2 and Figures 4-12 beside what was regenerated.

Everything here is read from the tables the studies wrote (tables/*.csv, computed from run records)
and from labtools.paper (the paper's printed values). Each comparison gets a verdict by the rules
below, which the report states; nothing is typed by hand.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from . import paper, provenance, results
from .metrics import CHANCE_ACC
from .records import CLUSTER

TOL_POINTS = 3.0  # a paper accuracy is reproduced when our mean is within this many points, no seed at chance
REPRODUCED, DIFFERS, COLLAPSED, NOT_COMPARABLE = "reproduced", "differs", "collapsed here", "not comparable here"
RULES = [
    f"**{REPRODUCED}**: our mean over seeds is within {TOL_POINTS:g} percentage points of the paper's value and "
    "no seed ended at chance; for a row where the paper itself is at chance: every one of our seeds ended at chance.",
    f"**{DIFFERS}**: outside that tolerance, or only some seeds at chance where the paper is at chance "
    "(or none), or some seeds at chance where the paper trained.",
    f"**{COLLAPSED}**: the paper trained, every one of our seeds ended at chance.",
    f"**{NOT_COMPARABLE}**: times, speeds and memory: this machine is not the paper's Raspberry Pi 4 cluster; "
    "a shape (where an optimum lies) is compared where the paper makes a claim about it.",
    f"'at chance': {CHANCE_ACC:.0%} test accuracy or less, or an exact collapse (loss within 1e-3 of ln 10) "
    "(labtools.metrics.is_at_chance).",
]


# Columns each table must have to be reported; a table written by older code lacks some.
_NEEDS = {"table2_strong_scaling": {"at_chance", "n_timed", "seeds"}, "table1_batch_sweep": {"avg_epoch_warm_s_mean", "seeds"},
          "table_selection_validation": {"chosen"}}


class StaleTable(ValueError):
    pass


def _read(tables: Path, name: str):
    import pandas as pd

    p = tables / f"{name}.csv"
    if not p.exists():
        return None
    t = pd.read_csv(p)
    missing = _NEEDS.get(name, set()) - set(t.columns)
    if missing:
        raise StaleTable(f"{p} was written by an older labtools (no {', '.join(sorted(missing))}); "
                         f"re-run its notebook (`labtools reproduce --profile {tables.parent.name} --stored-only`)")
    return t


def _pm(mean, std, d=2) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    return f"{mean:.{d}f}" + ("" if std is None or (isinstance(std, float) and math.isnan(std)) else f" ± {std:.{d}f}")


def accuracy_verdict(paper_acc: float, mean: float, n: int, at_chance: int) -> str:
    """The verdict for one accuracy comparison (rules: RULES)."""
    if n == 0:
        return "not run"
    if paper_acc <= 100 * CHANCE_ACC:
        if at_chance == n:
            return f"{REPRODUCED} (collapse)"
        if at_chance == 0:
            return f"{DIFFERS}: trains here, no seed at chance"
        return f"{DIFFERS}: {at_chance} of {n} seeds at chance here"
    if at_chance == n:
        return COLLAPSED
    if at_chance:
        return f"{DIFFERS}: {at_chance} of {n} seeds at chance here"
    d = mean - paper_acc
    return f"{REPRODUCED} ({d:+.1f} points)" if abs(d) <= TOL_POINTS else f"{DIFFERS} ({d:+.1f} points)"


def results_store(tables: Path, name: str) -> str | None:
    """The results store a table's runs were read from, relative to the profile's folder (the
    sidecar's results_store), or None for a table written before sidecars named it."""
    side = tables / f"{name}.provenance.json"
    return json.loads(side.read_text()).get("results_store") if side.exists() else None


def _run_links(per_run, np_, store: str | None = None) -> str:
    """Each seed's run: a link into the store the table was computed from, else its run id."""
    if per_run is None:
        return ""
    rows = per_run[per_run["np"] == np_]
    return ", ".join(f"[s{int(r.seed)}]({store}/{r.experiment}/{r.run_id}/)" if store and "experiment" in per_run else
                     f"s{int(r.seed)}: `{r.run_id}`" for r in rows.itertuples())


def _seeds(per_run, np_, col="test_acc_pct") -> str:
    if per_run is None:
        return ""
    rows = per_run[per_run["np"] == np_]
    return ", ".join(f"{getattr(r, col):.1f}" + ("*" if r.at_chance else "") for r in rows.itertuples())


def table2_section(t2, per_run, store: str | None = None) -> tuple[list[str], list[str]]:
    """(markdown lines, verdicts) for Table 2."""
    p2 = paper.table2().set_index("np")
    lines = ["## Table 2: strong scaling, row by row", "",
             f"Test accuracy after {int(t2.epochs.max())} epochs (the paper: 10 epochs, one value per np, 'cross-run means' "
             "of 3 repeats; here: "
             "mean ± sample std over seeds, each seed listed, * = at chance). "
             "[table](tables/table2_strong_scaling.md) · [every run](tables/table2_strong_scaling_runs.md)", "",
             "| np | paper test acc (%) | here (%) | n | each seed (%) | at chance (of which exact collapse) | paper train acc (%) | "
             "here train acc (%) | verdict | runs |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for r in t2.itertuples():
        pp = p2.loc[r.np] if r.np in p2.index else None
        pacc = float(pp.test_acc_pct) if pp is not None else float("nan")
        v = accuracy_verdict(pacc, r.test_acc_pct_mean, int(r.n_runs), int(r.at_chance)) if pp is not None \
            else "not in the paper"
        verdicts.append(v)
        lines.append(f"| {r.np} | {_pm(pacc, None)} | {_pm(r.test_acc_pct_mean, r.test_acc_pct_std)} | {r.n_runs} | "
                     f"{_seeds(per_run, r.np)} | {r.at_chance} ({r.collapsed}) | "
                     f"{_pm(float(pp.mean_train_acc_pct), None) if pp is not None else '—'} | "
                     f"{_pm(r.mean_train_acc_pct_mean, r.mean_train_acc_pct_std)} | {v} | {_run_links(per_run, r.np, store)} |")
    lines += ["", "Wall time, speedup and efficiency (the paper: 24 Raspberry Pi 4 nodes, 2 ranks each):", "",
              "| np | paper wall (s) | here wall (s) | n timed | paper S | here S | paper E (%) | here E (%) | verdict |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in t2.itertuples():
        pp = p2.loc[r.np] if r.np in p2.index else None
        why = r.wall_time_kind if r.n_timed == 0 else "a different machine (2-core x86, not RPi 4 nodes)"
        lines.append(f"| {r.np} | {_pm(float(pp.wall_s), None) if pp is not None else '—'} | "
                     f"{_pm(r.wall_s_mean, r.wall_s_std)} | {r.n_timed} | "
                     f"{_pm(float(pp.speedup), None, 3) if pp is not None else '—'} | {_pm(r.speedup, r.speedup_std, 3)} | "
                     f"{_pm(float(pp.efficiency_pct), None) if pp is not None else '—'} | "
                     f"{_pm(r.efficiency_pct, r.efficiency_pct_std)} | {NOT_COMPARABLE}: {why} |")
        verdicts.append(NOT_COMPARABLE)
    return lines, verdicts


def _not_cluster(row) -> str:
    """', and not a cluster time here (why)' for a Table 1 row timed beside other load, else ''."""
    kind = getattr(row, "wall_time_kind", CLUSTER)
    if not isinstance(kind, str) or kind == CLUSTER:
        return ""
    return "; here NOT a cluster time (" + "; ".join(sorted({k.split(": ", 1)[-1] for k in kind.split("; ")})) + ")"


def table1_section(t1) -> tuple[list[str], list[str], str]:
    """(markdown lines, verdicts, the shape verdict) for Table 1."""
    p1 = paper.table1().set_index("batch_per_node")
    lines = ["## Table 1: batch-size sweep, row by row", "",
             "[table](tables/table1_batch_sweep.md) · [every run](tables/table1_batch_sweep_runs.md). "
             "Definitions are the paper's (notes under the table).", "",
             "| batch/node | n | paper epoch (s) | here epoch (s) | paper step (s) | here step (s) | paper img/s | here img/s | "
             "paper peak RSS (MB) | here peak RSS (MB) | paper CPU (%) | here CPU (%) | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for r in t1.itertuples():
        pp = p1.loc[r.batch_per_node] if r.batch_per_node in p1.index else None
        g = (lambda c, d=2: _pm(float(getattr(pp, c)), None, d)) if pp is not None else (lambda c, d=2: "—")
        lines.append(f"| {r.batch_per_node} | {r.n_runs} | {g('avg_epoch_s')} | {_pm(r.avg_epoch_s_mean, r.avg_epoch_s_std)} | "
                     f"{g('mean_step_s', 3)} | {_pm(r.mean_step_s_mean, r.mean_step_s_std, 4)} | {g('global_img_per_s')} | "
                     f"{_pm(r.global_img_per_s_mean, r.global_img_per_s_std, 1)} | {g('peak_rss_mb', 1)} | "
                     f"{_pm(r.peak_rss_mb_mean, r.peak_rss_mb_std, 1)} | {g('cpu_pct', 1)} | {_pm(r.cpu_pct_mean, r.cpu_pct_std, 1)} | "
                     f"{NOT_COMPARABLE}: different hardware{_not_cluster(r)} |")
        verdicts.append(NOT_COMPARABLE)
    ours = int(t1.loc[t1.global_img_per_s_mean.idxmax(), "batch_per_node"])
    theirs = int(paper.table1().set_index("batch_per_node").global_img_per_s.idxmax())
    shape = (f"{REPRODUCED}: the highest throughput is at batch {ours}/node here too" if ours == theirs else
             f"{DIFFERS}: the highest throughput is at batch {ours}/node here, at {theirs}/node in the paper")
    lines += ["", f"Shape: the paper's claim that throughput peaks at batch {theirs}/node: **{shape}**."]
    return lines, verdicts, shape


def selection_section(val, test, t2=None) -> tuple[list[str], str | None]:
    if val is None:
        return [], None
    w = val[val.chosen].iloc[0]
    lines = ["## Beyond the paper: a configuration that trains at np = 48", "",
             "Chosen on a validation split (training images held out of every shard), by the rule in "
             "`labtools/studies/selection.py`, then reported on the test set with fresh seeds. "
             "[validation table](tables/table_selection_validation.md)"
             + (" · [test table](tables/table_selection_test.md)" if test is not None else ""), "",
             "| candidate | validation acc (%) | n | at chance | chosen |", "|---|---|---|---|---|"]
    for r in val.itertuples():
        lines.append(f"| {r.candidate} | {_pm(r.val_acc_pct_mean, r.val_acc_pct_std)} | {r.n_runs} | {r.at_chance} | "
                     f"{'**yes**' if r.chosen else ''} |")
    summary = None
    if test is not None:
        t = test.iloc[0]
        seeds = [c for c in test.columns if c.startswith("test_acc_pct_seed")]
        summary = (f"**{w.candidate}**, chosen on validation data, scores {_pm(t.test_acc_pct_mean, t.test_acc_pct_std)}% "
                   f"test accuracy at np = {int(t.np)} on fresh seeds ({', '.join(c[len('test_acc_pct_seed'):] for c in seeds)}; "
                   f"{int(t.at_chance)} of {int(t.n_runs)} at chance)")
        same = t2[t2.np == int(t.np)] if t2 is not None else []
        if len(same):
            p = same.iloc[0]
            summary += (f"; the paper's configuration at the same np: {_pm(p.test_acc_pct_mean, p.test_acc_pct_std)}% here "
                        f"({int(p.at_chance)} of {int(p.n_runs)} at chance), {paper.table2().set_index('np').loc[int(t.np), 'test_acc_pct']:.2f}% "
                        f"in the paper")
        summary += "."
        lines += ["", summary]
    return lines, summary


def build_report(out_dir) -> str:
    out_dir = Path(out_dir)
    tdir = out_dir / "tables"
    t1, t2 = _read(tdir, "table1_batch_sweep"), _read(tdir, "table2_strong_scaling")
    if t1 is None and t2 is None:
        raise FileNotFoundError(f"no Table 1 or Table 2 in {tdir}: run `labtools reproduce --profile {out_dir.name}` first")
    per_run = _read(tdir, "table2_strong_scaling_runs")
    val, test = _read(tdir, "table_selection_validation"), _read(tdir, "table_selection_test")
    body, verdicts, glance = [], {}, []
    if t2 is not None:
        lines, v = table2_section(t2, per_run, results_store(tdir, "table2_strong_scaling_runs"))
        body += lines + [""]
        verdicts["Table 2"] = v
        p2 = paper.table2().set_index("np")
        base = t2[t2.np == 2]
        if len(base):
            b = base.iloc[0]
            glance.append(f"**Accuracy at np = 2** (the paper's baseline): paper {p2.loc[2, 'test_acc_pct']:.2f}%, here "
                          f"{_pm(b.test_acc_pct_mean, b.test_acc_pct_std)}% over {b.n_runs} seeds "
                          f"(each: {_seeds(per_run, 2)}): {accuracy_verdict(p2.loc[2, 'test_acc_pct'], b.test_acc_pct_mean, b.n_runs, b.at_chance)}.")
        big = t2[t2.np >= 16]
        if len(big):
            glance.append(f"**Collapse at np ≥ 16** (the paper: every np ≥ 16 at chance): here {int(big.at_chance.sum())} of "
                          f"{int(big.n_runs.sum())} runs at np ≥ 16 ended at chance ({int(big.collapsed.sum())} exactly at ln 10); "
                          f"{int(t2[t2.np < 16].at_chance.sum())} of {int(t2[t2.np < 16].n_runs.sum())} runs at np < 16 did too. "
                          "Collapse is a per-seed event here, not a threshold in np.")
    if t1 is not None:
        lines, v, shape = table1_section(t1)
        body += lines + [""]
        verdicts["Table 1"] = v
        glance.append(f"**Batch-size sweep** (Table 1): absolute times are {NOT_COMPARABLE} (different hardware); "
                      f"the optimum: {shape}.")
    sel_lines, sel_summary = selection_section(val, test, t2)
    if sel_summary:
        glance.append("**Beyond the paper**: " + sel_summary)
    body += sel_lines + ([""] if sel_lines else [])
    body += figures_section(out_dir, t1, t2)
    counts = {}
    for vs in verdicts.values():
        for v in vs:
            k = v.split(" (")[0].split(":")[0]
            counts[k] = counts.get(k, 0) + 1
    head = [f"# Does the paper hold up? Reproduction report (profile `{out_dir.name}`)", "",
            "Every number below is read from the tables in `tables/` (computed from the run records of "
            f"{_store_named(tdir)}) "
            "and from the paper's printed Tables 1-2 (`labtools/paper.py`); this file is generated by "
            "`labtools report` / `labtools reproduce`, never edited by hand.", "",
            "## At a glance", ""] + [f"- {g}" for g in glance] + [
            "- Verdicts over the rows of Tables 1-2 compared below: "
            + ", ".join(f"{k}: {n}" for k, n in sorted(counts.items())) + ".", "",
            "Verdict rules:", ""] + [f"- {r}" for r in RULES] + [""]
    return "\n".join(head + body) + "\n"


def _store_named(tdir: Path) -> str:
    """The store(s) the tables were computed from, as their sidecars name them (relative to the report)."""
    stores = sorted({s for p in tdir.glob("*.provenance.json")
                     if (s := json.loads(p.read_text()).get("results_store"))})
    return ("the results store " + ", ".join(f"`{s}/`" for s in stores) + ", a path relative to this file"
            if stores else "the results store")


def figures_section(out_dir: Path, t1, t2) -> list[str]:
    fdir = out_dir / "figures"
    p2 = paper.table2().set_index("np")

    def link(name):
        return f"[{name}](figures/{name}.png)" if (fdir / f"{name}.png").exists() else f"{name} (not generated)"

    def acc_summary(col, paper_col):
        if t2 is None:
            return "no Table 2"
        out = []
        for r in t2.itertuples():
            if r.np in p2.index:
                v = accuracy_verdict(float(p2.loc[r.np, paper_col]), getattr(r, f"{col}_mean"), int(r.n_runs), int(r.at_chance))
                out.append(v.split(" (")[0].split(":")[0])
        return ", ".join(f"{out.count(k)} np {k}" for k in dict.fromkeys(out))

    rows = [
        ("4-5", "epoch time and throughput vs batch size", "fig04_05_batch_sweep",
         f"{NOT_COMPARABLE} (absolute); shape: see Table 1" if t1 is not None else "no Table 1"),
        ("6", "per-rank log, np = 2", "fig06_rank_log_np2", "see Table 2, np = 2"),
        ("7", "per-rank log, np = 4", "fig07_rank_log_np4", "see Table 2, np = 4"),
        ("8", "speedup vs np", "fig08_speedup", f"{NOT_COMPARABLE}: only cluster-valid times have a speedup"),
        ("9", "efficiency vs np", "fig09_efficiency", f"{NOT_COMPARABLE}: only cluster-valid times have an efficiency"),
        ("10", "train accuracy vs np", "fig10_train_accuracy", acc_summary("mean_train_acc_pct", "mean_train_acc_pct")),
        ("11", "total training time vs np", "fig11_total_time", f"{NOT_COMPARABLE}: different hardware"),
        ("12", "train loss vs np", "fig12_train_loss", "follows Figure 10 (loss at ln 10 where at chance)"),
        ("—", "test accuracy vs np (Table 2's column)", "fig_test_accuracy", acc_summary("test_acc_pct", "test_acc_pct")),
    ]
    lines = ["## Figures 4-12", "", "| paper figure | what | verdict | regenerated |", "|---|---|---|---|"]
    lines += [f"| {n} | {what} | {v} | {link(name)} |" for n, what, name, v in rows]
    return lines + [""]


def write_report(out_dir) -> list[Path]:
    """Write REPORT.md, REPORT.html and REPORT.provenance.json into out_dir (e.g. figures/paper)."""
    import markdown

    out_dir = Path(out_dir)
    md = build_report(out_dir)
    html = ("<!doctype html><meta charset='utf-8'><title>labtools reproduction report</title><style>"
            "body{font-family:system-ui,sans-serif;max-width:75em;margin:2em auto;padding:0 1em;line-height:1.45}"
            "table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .5em}"
            "th{background:#f3f3f3}</style>\n" + markdown.markdown(md, extensions=["tables"]))
    paths = [out_dir / "REPORT.md", out_dir / "REPORT.html"]
    results.atomic_write_text(paths[0], md)
    results.atomic_write_text(paths[1], html + "\n")
    # Inputs only (the tables' sidecars name their run ids): the sidecar changes when an input does.
    inputs = {p.name: json.loads(p.read_text()).get("run_ids", []) for p in sorted((out_dir / "tables").glob("*.provenance.json"))}
    side = out_dir / "REPORT.provenance.json"
    results.write_json(side, {"inputs": inputs, "versions": {"labtools": provenance.versions().get("labtools")},
                              "files": [p.name for p in paths]})
    return paths + [side]
