"""How record files are written (atomically, fsynced; appends under a lock) and read back into pandas.

What a run folder holds, and in which order it is written, is labtools.record's (RunRecord): a run
is completed when its manifest says so, which is written last. ``OUT/EXPERIMENT/scaling_results.csv``
has one row per completed run (the paper's columns), rebuilt from the records (record.rebuild_scaling_csv).
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


def atomic_write_bytes(path: str | os.PathLike, data: bytes | None = None, writer=None) -> None:
    """Write a file so that readers see the old one or the whole new one, even after a crash:
    temp file in the same folder, fsync, rename, fsync the folder. ``writer(f)`` streams instead."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; records are meant to be shared
        with os.fdopen(fd, "wb") as f:
            if writer is None:
                f.write(data)
            else:
                writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


_UMASK = os.umask(0)
os.umask(_UMASK)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


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


# ---------------------------------------------------------------- reading

def run_dirs(root="results", experiment: str | None = None, completed: bool = True,
             unreadable: bool = False) -> list[Path]:
    """Run folders under root; with completed=True only those whose manifest says `completed`
    (written last, after the summary: labtools.record). A folder whose manifest cannot be read is
    left out with a warning naming the file (one bad record never stops a reader of the others);
    unreadable=True keeps it (`labtools runs` lists it as unreadable)."""
    base = Path(root) / experiment if experiment else Path(root)
    pattern = "*/manifest.json" if experiment else "*/*/manifest.json"
    dirs = sorted(p.parent for p in base.glob(pattern))
    if not unreadable:
        dirs = [d for d in dirs if readable(d)]
    return [d for d in dirs if not completed or is_completed(d)]


def readable(d: Path) -> bool:
    """The run folder's manifest (and summary, if there is one) parse; if not, a warning says which
    file and that the run is left out."""
    for name in ("manifest.json", "summary.json"):
        f = Path(d) / name
        if name == "summary.json" and not f.exists():
            continue
        try:
            if not isinstance(read_json(f), dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            import warnings

            warnings.warn(f"{f} cannot be read ({type(e).__name__}: {e}); run {Path(d).parent.name}/{Path(d).name} "
                          f"is left out", UnreadableRecord, stacklevel=3)
            return False
    return True


class UnreadableRecord(UserWarning):
    """A run folder whose manifest or summary cannot be read; readers leave it out and say so."""


def is_completed(d: Path) -> bool:
    """The run folder's manifest says `completed` (written last) and its summary is there."""
    if not (d / "summary.json").exists():
        return False
    try:
        return read_json(d / "manifest.json").get("status") == "completed"
    except (OSError, ValueError):
        return False


def read_record(d) -> tuple[dict, dict | None]:
    """A run folder's (manifest, summary), migrated to today's schema (summary None if not completed)."""
    from .records import migrate

    d = Path(d)
    s = read_json(d / "summary.json") if (d / "summary.json").exists() else None
    m, s2 = migrate(read_json(d / "manifest.json"), s)
    return m, (s2 if s is not None else None)


def load_runs(root="results", experiment: str | None = None, stale: bool = False, include_incomplete: bool = False):
    """One row per completed run: flattened config (cfg_*), manifest facts and summary metrics.

    Records are migrated (labtools.records.migrate). Runs whose numbers today's code would not
    reproduce (numerics_current False) are left out unless stale=True. include_incomplete=True adds
    the runs that did not complete, with their status (failed, interrupted, running, died) and no
    metrics. A root that does not exist is an error, not an empty table; a root without matching
    records gives an empty table and a warning that says so (and how many stale runs were left out).
    """
    import pandas as pd

    base = Path(root) / experiment if experiment else Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"no results folder {base.resolve()}")
    from .record import status

    rows, left_out = [], 0
    for d in run_dirs(root, experiment, completed=not include_incomplete):
        m, s = read_record(d)
        if not (stale or m["numerics_current"]):
            left_out += 1
            continue
        st = status(d)
        if st != "completed":
            s = {}
        row = {"run_dir": str(d), "run_id": d.name, "experiment": d.parent.name, "status": st}
        row.update({f"cfg_{k}": v for k, v in m["config"].items()})
        row.update({k: m.get(k) for k in ("world", "processes", "cluster_wall_time", "wall_time_kind", "science_key",
                                          "git_commit", "numerics_version", "numerics_current", "eval_set")})
        row.update(s)
        rows.append(row)
    if not rows:
        import warnings

        warnings.warn(f"no {'' if include_incomplete else 'completed '}run records in {base.resolve()}"
                      + (f"; {left_out} made by code whose numbers differ from today's were left out "
                         "(stale=True includes them)" if left_out else ""), stacklevel=2)
    return pd.DataFrame(rows)


def load_epochs(run_dir):
    import pandas as pd

    return pd.read_csv(Path(run_dir) / "epochs.csv")


def load_rank_epochs(run_dir):
    """All logical ranks' per-epoch rows of one run, with a 'rank' column."""
    import pandas as pd

    parts = [pd.read_csv(p) for p in sorted((Path(run_dir) / "ranks").glob("rank_*.csv"))]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
