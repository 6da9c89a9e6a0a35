"""Where run records live, how they are written (atomically) and read back into pandas.

A run directory ``OUT/EXPERIMENT/RUN_ID/`` is self-describing:
  manifest.json   config, world N and processes P, hosts, versions, git commit, times
  summary.json    final metrics (written last: its presence means the run completed)
  epochs.csv      per epoch, global: test loss/acc, mean train loss/acc, diagnostics, times
  ranks/rank_NNN.csv  per logical rank and epoch: loss, acc, seconds, step time, img/s, RSS, CPU %
  error.txt       only when the run failed
and ``OUT/EXPERIMENT/scaling_results.csv`` gets one row per completed run (the paper's columns).
"""
from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path

SCALING_COLUMNS = ["world", "epochs", "batch_per_node", "batch_per_rank", "mean_train_loss",
                   "mean_train_acc_pct", "global_time_sec", "cifar_dir",
                   "test_acc_pct", "test_loss", "processes", "sync", "seed", "run_id"]


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


def write_csv(path, rows: list[dict], columns: list[str] | None = None) -> None:
    columns = columns or (list(rows[0]) if rows else [])
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def append_csv_row(path, row: dict, columns: list[str]) -> None:
    """Rewrite-and-rename append: readers never see a half-written row."""
    path = Path(path)
    # newline="": keep the rows already there byte for byte (csv writes \r\n line ends)
    old = open(path, newline="").read() if path.exists() else ""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    if not old:
        w.writeheader()
    w.writerow(row)
    atomic_write_text(path, old + buf.getvalue())


# ---------------------------------------------------------------- reading

def run_dirs(root="results", experiment: str | None = None, completed: bool = True) -> list[Path]:
    base = Path(root) / experiment if experiment else Path(root)
    pattern = "*/manifest.json" if experiment else "*/*/manifest.json"
    dirs = sorted(p.parent for p in base.glob(pattern))
    return [d for d in dirs if not completed or (d / "summary.json").exists()]


def read_record(d) -> tuple[dict, dict | None]:
    """A run folder's (manifest, summary), migrated to today's schema (summary None if not completed)."""
    from .records import migrate

    d = Path(d)
    s = read_json(d / "summary.json") if (d / "summary.json").exists() else None
    m, s2 = migrate(read_json(d / "manifest.json"), s)
    return m, (s2 if s is not None else None)


def load_runs(root="results", experiment: str | None = None, stale: bool = False):
    """One row per completed run: flattened config (cfg_*), manifest facts and summary metrics.

    Records are migrated (labtools.records.migrate). Runs whose numbers today's code would not
    reproduce (numerics_current False) are left out unless stale=True. A root that does not exist is
    an error, not an empty table.
    """
    import pandas as pd

    base = Path(root) / experiment if experiment else Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"no results folder {base.resolve()}")
    rows = []
    for d in run_dirs(root, experiment):
        m, s = read_record(d)
        if not (stale or m["numerics_current"]):
            continue
        row = {"run_dir": str(d), "run_id": d.name, "experiment": d.parent.name}
        row.update({f"cfg_{k}": v for k, v in m["config"].items()})
        row.update({k: m.get(k) for k in ("world", "processes", "cluster_wall_time", "wall_time_kind", "science_key",
                                          "git_commit", "numerics_version", "numerics_current", "eval_set")})
        row.update(s)
        rows.append(row)
    return pd.DataFrame(rows)


def load_epochs(run_dir):
    import pandas as pd

    return pd.read_csv(Path(run_dir) / "epochs.csv")


def load_rank_epochs(run_dir):
    """All logical ranks' per-epoch rows of one run, with a 'rank' column."""
    import pandas as pd

    parts = [pd.read_csv(p) for p in sorted((Path(run_dir) / "ranks").glob("rank_*.csv"))]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
