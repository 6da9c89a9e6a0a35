"""`labtools runs`: what have I run? One row per run folder of the results store, newest first.

Everything is read through what already owns it: results.run_dirs / results.read_record (the
manifest and summary, migrated to today's schema) and record.status (completed, failed,
interrupted, running, or died: running on disk but its heartbeat stopped). Runs that did not
complete are listed too, without an accuracy.
"""
from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path

COLUMNS = ["run", "experiment", "status", "np", "P", "strategy", "seed", "epochs", "accuracy", "wall", "age"]
NEWEST = 20  # rows shown without --all


class ListingError(ValueError):
    """A results folder or experiment that is not there; one sentence for the user."""


def run_rows(root, experiment: str | None = None, now: _dt.datetime | None = None) -> list[dict]:
    """One dict per run folder under root (or root/experiment), newest first, with COLUMNS and a
    sortable ``start_utc``. A folder whose record cannot be read is a row saying so."""
    from . import results
    from .profiles import strategy_name
    from .record import status

    now = now or _dt.datetime.now(_dt.timezone.utc)
    rows = []
    for d in results.run_dirs(root, experiment, completed=False, unreadable=True):
        row = {c: "" for c in COLUMNS} | {"run": d.name, "experiment": d.parent.name}
        try:
            m, s = results.read_record(d)
            st = status(d)
        except (OSError, ValueError, KeyError, TypeError) as e:
            rows.append(row | {"status": f"unreadable ({type(e).__name__})", "start_utc": ""})
            continue
        cfg = m.get("config", {})
        done, total = m.get("epochs_done", 0), cfg.get("epochs", "?")
        eset = (s or {}).get("eval_set", m.get("eval_set", "test"))
        acc = (s or {}).get(f"{eset}_acc") if st == "completed" else None
        row.update({
            "status": st, "np": m.get("world", ""), "P": m.get("processes", ""),
            "strategy": strategy_name(cfg),
            "seed": cfg.get("seed", ""),
            "epochs": str(total) if st == "completed" else f"{done}/{total}" + _resumable(d, m, done),
            "accuracy": "" if acc is None else f"{100 * acc:5.2f}% {'test' if eset == 'test' else 'val'}",
            "wall": "" if not s or s.get("global_wall_s") is None else duration(s["global_wall_s"]),
            "age": age(m.get("start_utc"), now),
            "start_utc": m.get("start_utc") or "",
        })
        rows.append(row)
    # newest first: by start time, then by name (run ids start with their UTC start time)
    rows.sort(key=lambda r: (r["start_utc"], r["run"]), reverse=True)
    return rows


def _resumable(d: Path, m: dict, done: int) -> str:
    """Where a resume would continue when that is not after the last recorded epoch: the
    checkpoint holds fewer epochs (its write failed)."""
    if not (d / "checkpoint.npz").is_file():
        return ""
    k = (m.get("checkpoint") or {}).get("epochs_done")
    return f" (ckpt {k})" if k is not None and k != done else ""


def duration(seconds: float) -> str:
    """12.3s, 4m05s, 2h03m."""
    s = float(seconds)
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def age(start_utc: str | None, now: _dt.datetime) -> str:
    """How long ago an ISO-8601 UTC time was: "just now", "5 min ago", "3 h ago", "2 d ago"."""
    if not start_utc:
        return ""
    try:
        t = _dt.datetime.fromisoformat(start_utc)
    except ValueError:
        return ""
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.timezone.utc)
    s = (now - t).total_seconds()
    if s < 60:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{int(s // size)} {unit} ago"
    return ""  # unreachable


def table(rows: list[dict]) -> str:
    """The rows as a left-aligned text table (pandas), one line per run."""
    import pandas as pd

    df = pd.DataFrame(rows, columns=COLUMNS).astype(str)
    right = {"np", "P", "seed", "epochs", "wall"}
    fmt = {}
    for c in COLUMNS:
        w = max(len(c), df[c].str.len().max() if len(df) else 0)
        fmt[c] = (lambda v, w=w: v.rjust(w)) if c in right else (lambda v, w=w: v.ljust(w))
    text = df.to_string(index=False, formatters=fmt, justify="left")
    return "\n".join(line.rstrip() for line in text.splitlines())


def default_out() -> str:
    """Where `labtools train` writes runs unless --out says otherwise: RunConfig's own default."""
    from dataclasses import fields

    from .config import RunConfig

    return next(f.default for f in fields(RunConfig) if f.name == "out")


def no_runs(root) -> str:
    """The one sentence for a results folder without runs (missing or empty), with where runs are."""
    from . import results

    train = "`labtools train`" if str(root) == default_out() else f"`labtools train --out {root}`"
    where = f"No runs yet: {root} does not exist ({train} creates it)" if not Path(root).is_dir() else \
        f"No runs in {root} yet ({train} writes them there)"
    parent = Path(root).resolve().parent
    others = len(results.run_dirs(parent, completed=False, unreadable=True)) if parent != Path(root).resolve() else 0
    if others:
        where += f"; {others} runs are in {os.path.relpath(parent)} (`labtools runs --results {os.path.relpath(parent)}`)"
    return where + "."


def render(root, experiment: str | None = None, show_all: bool = False, now: _dt.datetime | None = None) -> str:
    """What `labtools runs` prints. ListingError for a folder or an experiment that is not there."""
    base = Path(root) / experiment if experiment else Path(root)
    if not Path(root).is_dir():
        raise ListingError(f"no results folder {root}.")
    if experiment and not base.is_dir():
        exps = sorted(p.name for p in Path(root).iterdir() if p.is_dir() and any(p.glob("*/manifest.json")))
        raise ListingError(f"no experiment {experiment!r} in {root}"
                           + (f"; its experiments: {', '.join(exps)}." if exps else "; it holds no runs yet."))
    if not experiment and not any(Path(root).glob("*/*/manifest.json")) and any(Path(root).glob("*/manifest.json")):
        root, experiment = Path(root).parent, Path(root).name  # an experiment's folder given as the root
    rows = run_rows(root, experiment, now)
    if not rows:
        return (f"No runs in {base} yet.\n" if experiment else no_runs(root) + "\n")
    shown = rows if show_all else rows[:NEWEST]
    out = table(shown) + "\n"
    if len(shown) < len(rows):
        out += f"({len(shown)} newest of {len(rows)} runs; --all lists every one)\n"
    return out
