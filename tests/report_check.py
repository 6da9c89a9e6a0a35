"""What a rendered REPORT.md must hold, checked against the files it points at (used by
tests/test_metrics_tables.py on the committed figures/paper and tests/test_notebooks.py on a smoke render).

- every relative link in REPORT.md and REPORT.html resolves to a file or folder that exists;
- Table 2 links every seed to its run folder, and each seed's accuracy and its at-chance mark (*)
  are what that run's summary.json says: a seed is marked at chance exactly when its accuracy is
  at most 11 % or its loss is within 1e-3 of ln 10 (an exact collapse); the row's count says as many.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from labtools.metrics import is_collapsed

LINK = re.compile(r"\[([^\]]*)\]\(([^)\s]+)\)")
HREF = re.compile(r"href=\"([^\"]+)\"")


def _local(target: str) -> bool:
    return not re.match(r"^[a-z]+:", target) and not target.startswith("#")


def link_problems(report_dir: Path) -> list[str]:
    out = []
    md = (report_dir / "REPORT.md").read_text()
    html = (report_dir / "REPORT.html").read_text()
    targets = [t for _, t in LINK.findall(md)] + HREF.findall(html)
    for t in targets:
        if _local(t) and not (report_dir / t.split("#")[0]).exists():
            out.append(f"link {t} does not resolve from {report_dir}")
    if not any(_local(t) for t in targets):
        out.append("no local link at all")
    return out


def table2_rows(md: str) -> list[list[str]]:
    """The cells of Table 2's accuracy rows (the first table after '## Table 2')."""
    part = md.split("## Table 2", 1)[1].split("\n\n| np |", 1)[1]
    rows = []
    for line in part.splitlines()[2:]:
        if not line.startswith("| "):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split(" | ")])
    return rows


def at_chance_problems(report_dir: Path) -> list[str]:
    out = []
    rows = table2_rows((report_dir / "REPORT.md").read_text())
    if not rows:
        return ["no Table 2 rows"]
    for cells in rows:
        np_, seeds, chance, runs = cells[0], cells[4], cells[5], cells[9]
        shown = [s.strip() for s in seeds.split(",")]
        links = LINK.findall(runs)
        if len(links) != len(shown):
            out.append(f"np {np_}: {len(shown)} seeds but {len(links)} run links ({runs!r})")
            continue
        stars = sum(s.endswith("*") for s in shown)
        for s, (_, target) in zip(shown, links):
            if not (report_dir / target / "summary.json").is_file():
                out.append(f"np {np_}: seed {s}: no summary.json under {target}")
                continue
            summary = json.loads((report_dir / target / "summary.json").read_text())
            ev = summary.get("eval_set", "test")
            acc, loss = summary[f"{ev}_acc"], summary[f"{ev}_loss"]
            marked = s.endswith("*")
            if s.rstrip("*") != f"{100 * acc:.1f}":
                out.append(f"np {np_}: seed shown as {s}, its record says {100 * acc:.2f} % ({target})")
            if marked != (acc <= 0.11 or is_collapsed(loss)):
                out.append(f"np {np_}: seed {s} at {100 * acc:.2f} %, loss {loss:.4f} is "
                           f"{'' if marked else 'not '}marked at chance ({target})")
        if int(chance.split()[0]) != stars:
            out.append(f"np {np_}: 'at chance' says {chance}, {stars} seeds are marked")
    return out


def report_problems(report_dir) -> list[str]:
    report_dir = Path(report_dir)
    return link_problems(report_dir) + at_chance_problems(report_dir)
