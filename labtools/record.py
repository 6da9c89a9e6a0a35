"""RunRecord: the one owner of a run's folder and of everything written into it.

``OUT/EXPERIMENT/RUN_ID/``
  manifest.json       facts of the run and its status: running -> completed | failed | interrupted
  .heartbeat          touched every HEARTBEAT_S while the run lives (readers tell a run that died)
  epochs.csv          per epoch, global;  ranks/rank_NNN.csv: per logical rank and epoch
  checkpoint.npz      every logical rank's state after the last finished epoch (what --resume reads)
  summary.json        final metrics;  error.txt: why a run failed or stopped
and one row per completed run in ``OUT/EXPERIMENT/scaling_results.csv`` (appended under a lock).

Rules: the folder is created exclusively and its name is a plain name; every file is written
atomically (temp + fsync + rename); status changes happen under a lock on the folder and a finished
status is never overwritten by a late writer; ``completed`` is written last, after the summary, the
scaling row and the CSVs are on disk. Only the root process writes (other processes hold a
RunRecord for its path and for marking a failure when the root cannot).
"""
from __future__ import annotations

import fcntl
import io
import json
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from . import provenance, results
from .config import PLAIN_NAME, ConfigError

RUNNING, COMPLETED, FAILED, INTERRUPTED, DIED = "running", "completed", "failed", "interrupted", "died"
FINAL = (COMPLETED, FAILED, INTERRUPTED)
HEARTBEAT_S = 15.0
DEAD_AFTER_S = 180.0  # a running record whose heartbeat is older than this has died


class RecordError(ConfigError):
    """A run folder that cannot be created, continued or written; one sentence for the user."""


def check_writable(out, experiment: str) -> None:
    """--out can hold OUT/EXPERIMENT (checked before any work; nothing is left behind)."""
    target = Path(out) / experiment
    probe = target
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise RecordError(f"--out {out}: {probe} is a file, not a folder.")
    try:
        import tempfile

        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise RecordError(f"--out {out} is not writable ({e.strerror} in {probe}).") from None


def check_free(out, experiment: str, run_id: str | None) -> None:
    """A given --run-id names no existing folder (checked before any work; create() checks again)."""
    if run_id and (Path(out) / experiment / run_id).exists():
        d = Path(out) / experiment / run_id
        raise RecordError(f"run folder {d} already exists; choose another --run-id, or continue "
                          f"that run with `labtools train --resume {d}`.")


def describe(cfg, *, world, processes, ranks_per_process, hosts, pids, cores_per_host, mpi_library,
             n_train, n_eval, steps_per_epoch, threads, kernels: dict | None = None) -> dict:
    """The manifest's facts about a run, computed once: the whole config (portable paths), the launch
    (N, P, hosts, cores, MPI), the code (git commit, versions, numerics) and the data sizes."""
    from . import numerics

    return {
        "config": {**cfg.to_dict(), "cifar_dir": provenance.portable_path(cfg.cifar_dir),
                   "out": provenance.portable_path(cfg.out)},
        "world": world, "processes": processes, "ranks_per_process": ranks_per_process, "hosts": hosts,
        "pids": pids, "cores_per_host": dict(cores_per_host), "mpi_library": mpi_library, "threads": threads,
        "batch_per_rank": cfg.batch_per_rank, "science_key": cfg.science_key(), "seed": cfg.seed,
        "git_commit": provenance.git_commit(), "versions": provenance.versions(), "host": provenance.host(),
        "start_utc": provenance.utc_now(), "n_train": n_train, "n_eval": n_eval, "eval_set": cfg.eval_set,
        "n_test": n_eval if cfg.eval_set == "test" else 0, "steps_per_epoch": steps_per_epoch,
        "numerics_version": numerics.VERSION, "numerics_sources": numerics.sources_sha(),
        # set by labtools.emulate for hosts that are network namespaces of one machine
        "emulated_hosts": os.environ.get("LABTOOLS_EMULATED_HOSTS"),
        # which implementation ran the optimizer update and the per-step Allreduce (same numbers; speed)
        "kernels": kernels,
    }


class RunRecord:
    def __init__(self, run_dir):
        self.dir = Path(run_dir)
        self.manifest: dict = {}
        self.epoch_rows: list[dict] = []
        self.rank_rows: dict[int, list[dict]] = {}
        self._beat = None

    # ------------------------------------------------------------------ create / open
    @classmethod
    def create(cls, out, experiment: str, run_id: str | None, default_id: str) -> "RunRecord":
        """A new, empty run folder, created exclusively (two runs can never share one)."""
        name = run_id or default_id
        if not PLAIN_NAME.fullmatch(name):
            raise RecordError(f"run id must be a plain folder name; got {name!r}.")
        parent = Path(out) / experiment
        parent.mkdir(parents=True, exist_ok=True)
        for i in range(1, 1000):
            d = parent / (name if i == 1 else f"{name}-{i}")
            try:
                d.mkdir()
                return cls(d)
            except FileExistsError:
                if run_id:
                    raise RecordError(f"run folder {d} already exists; choose another --run-id, or continue "
                                      f"that run with `labtools train --resume {d}`.") from None
        raise RecordError(f"could not create a new run folder under {parent}.")

    @classmethod
    def open(cls, run_dir, cfg=None, force: bool = False) -> "RunRecord":
        """An existing run to continue (with cfg: checked to compute what the run computed). force:
        continue a `running` record whose processes ran on another host (the user checked they are gone)."""
        d = Path(run_dir)
        if not (d / "manifest.json").is_file():
            raise RecordError(f"--resume {d}: no manifest.json there; give the run's folder (OUT/EXPERIMENT/RUN_ID).")
        rec = cls(d)
        rec.manifest = results.read_json(d / "manifest.json")
        st = status(d)
        if st == COMPLETED:
            raise RecordError(f"--resume {d}: the run already completed; nothing to continue.")
        if st == RUNNING and (not force or live_here(rec.manifest)):
            raise RecordError(still_running(d, rec.manifest))
        if cfg is not None:
            from . import numerics

            old = rec.manifest
            if old.get("science_key") != cfg.science_key() or old.get("world") != cfg.np:
                raise RecordError(f"--resume {d}: this launch computes something else than the run recorded there.")
            if old.get("numerics_sources") not in numerics.same_numbers() | {numerics.sources_sha()}:
                raise RecordError(f"--resume {d}: the run was started by code that computes differently "
                                  f"(numerics sources {old.get('numerics_sources')}); start a new run instead.")
        return rec

    def remove_segments(self) -> list[str]:
        """The recorded MPI segments of this host that no live process maps any more (the run is not
        running: its job was killed whole and MPI_Finalize never removed them)."""
        import socket

        from .keeper import remove_segments

        mine = {p for h, p in self.manifest.get("shm") or [] if h == socket.gethostname() and os.path.exists(p)}
        if not mine:
            return []
        for maps in Path("/proc").glob("[0-9]*/maps"):
            try:
                mine -= {p for p in mine if p in maps.read_text()}
            except OSError:
                pass
        return remove_segments(sorted(mine))

    # ------------------------------------------------------------------ status
    @contextmanager
    def _locked(self):
        with open(self.dir / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def write_manifest(self, status_: str | None = None, _reopen: bool = False, **fields) -> bool:
        """Merge fields (and a status) into the manifest on disk, under the folder lock. A final
        status already there is kept: a late writer never turns `failed` back into `running` (only
        a resume reopens a run). Any process may call it, e.g. the keeper of a killed process."""
        with self._locked():
            path = self.dir / "manifest.json"
            disk = results.read_json(path) if path.exists() else {}
            if disk.get("status") in FINAL and not _reopen:
                return False
            base = {} if _reopen else disk  # a resume writes its whole manifest (old end_utc/error dropped)
            self.manifest = {**base, **self.manifest, **fields, **({"status": status_} if status_ else {})}
            results.write_json(path, self.manifest)
            return True

    def start(self, manifest: dict, resumed: dict | None = None, shm=None) -> None:
        """Write the manifest (status running) and start the heartbeat. shm: [(host, path)] of the
        job's MPI shared-memory segments, removed by a later resume if the job was killed whole."""
        if resumed:
            self.manifest.update({k: v for k, v in manifest.items() if k not in ("start_utc",)})
            self.manifest["resumed"] = self.manifest.get("resumed", []) + [resumed]
            for k in ("end_utc", "error"):
                self.manifest.pop(k, None)
            (self.dir / "error.txt").unlink(missing_ok=True)
        else:
            self.manifest = dict(manifest)
        if shm is not None:
            self.manifest["shm"] = [list(x) for x in shm]
        self.write_manifest(RUNNING, _reopen=bool(resumed))
        self._start_heartbeat()

    def _start_heartbeat(self) -> None:
        stop = threading.Event()

        def beat():
            while True:
                try:
                    (self.dir / ".heartbeat").touch()
                except OSError:
                    pass  # a full disk cannot stop a touch of an existing file; anything else: readers see age
                if stop.wait(HEARTBEAT_S):
                    return

        t = threading.Thread(target=beat, name="labtools-heartbeat", daemon=True)
        t.start()
        self._beat = stop

    def stop_heartbeat(self) -> None:
        if self._beat:
            self._beat.set()

    def mark(self, status_: str, error: str, **fields) -> None:
        """failed or interrupted, with the reason (and fields, e.g. the processes that did not arrive
        at a stuck collective); best effort (the disk may be what failed)."""
        self.stop_heartbeat()
        try:
            results.atomic_write_text(self.dir / "error.txt", error.rstrip() + "\n")
        except OSError:
            pass
        try:
            self.write_manifest(status_, end_utc=provenance.utc_now(), error=error.strip().splitlines()[0][:1000],
                                **fields)
        except OSError:
            pass  # the heartbeat stops: readers will say `died`

    # ------------------------------------------------------------------ per epoch
    def add_epoch(self, row: dict, rank_rows: list[dict]) -> None:
        self.epoch_rows.append(row)
        for r in rank_rows:
            self.rank_rows.setdefault(r["rank"], []).append(r)
        results.write_csv(self.dir / "epochs.csv", self.epoch_rows)
        for r, rows in self.rank_rows.items():
            results.write_csv(self.dir / "ranks" / f"rank_{r:03d}.csv", rows)
        self.write_manifest(epochs_done=len(self.epoch_rows))

    # ------------------------------------------------------------------ checkpoint
    def save_checkpoint(self, states: dict[int, list[np.ndarray]], meta: dict) -> None:
        """Every logical rank's (weights, optimizer state) plus meta and the records so far, in one
        atomic file. Identical arrays (ranks after a weight average) are stored once."""
        import hashlib

        arrays, refs, seen = {}, {}, {}
        for r, parts in sorted(states.items()):
            refs[str(r)] = []
            for a in parts:
                key = (a.dtype.str, a.shape, hashlib.sha256(np.ascontiguousarray(a).data).digest())
                if key not in seen:
                    seen[key] = f"a{len(seen)}"
                    arrays[seen[key]] = a
                refs[str(r)].append(seen[key])
        meta = {**meta, "states": refs, "epoch_rows": self.epoch_rows,
                "rank_rows": {str(r): rows for r, rows in self.rank_rows.items()}}
        blob = np.frombuffer(json.dumps(meta, default=float).encode(), np.uint8)
        path = self.dir / "checkpoint.npz"
        results.atomic_write_bytes(path, writer=lambda f: np.savez(f, meta=blob, **arrays))
        # its checksum, kept in the manifest: a resume tells a damaged file from the one written here
        self.write_manifest(checkpoint={"sha256": _sha256(path), "epochs_done": meta.get("epochs_done")})

    def load_checkpoint(self) -> tuple[dict, dict[int, list[np.ndarray]]] | None:
        """(meta, states) of the last checkpoint, and the records up to it; None if there is none.
        Every array is read (zip CRC) and the file's checksum compared with the one recorded when it
        was written: a damaged file is one RecordError sentence saying how to go on."""
        path = self.dir / "checkpoint.npz"
        if not path.is_file():
            return None
        why = None
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(z["meta"].tobytes())
                arrays = {k: z[k] for k in z.files if k != "meta"}
            states = {int(r): [arrays[k] for k in keys] for r, keys in meta.pop("states").items()}
            epoch_rows, rank_rows = meta.pop("epoch_rows"), meta.pop("rank_rows")
        except Exception as e:  # noqa: BLE001 - zipfile, zlib, numpy and json each raise their own
            why = "the file is empty" if path.stat().st_size == 0 else f"{type(e).__name__}: {str(e)[:80]}"
        rec = (self.manifest or {}).get("checkpoint") or {}
        if why is None and rec.get("sha256") and rec["sha256"] != _sha256(path) and \
                not meta.get("epochs_done", 0) > (rec.get("epochs_done") or 0):  # newer: its checksum write was lost
            why = f"its checksum differs from the one recorded after epoch {rec.get('epochs_done')}"
        if why is not None:
            raise RecordError(f"{path} is damaged ({why}), so the run cannot continue from it; to start it again "
                              f"from epoch 1 in the same folder, delete that file and run `labtools train --resume "
                              f"{self.dir}`, or start a new run.")
        self.epoch_rows = epoch_rows
        self.rank_rows = {int(r): rows for r, rows in rank_rows.items()}
        return meta, states

    # ------------------------------------------------------------------ the end
    def summarize(self, cfg, processes: int, global_wall: float, other_cores: dict, digests: dict,
                  init_diag: dict) -> dict:
        """The run's summary from its epoch rows, and its wall-time kind, decided here once."""
        from . import records

        m = self.manifest
        kind = records.RESUMED if m.get("resumed") else records.EMULATED if m.get("emulated_hosts") else \
            records.wall_time_kind(m["world"], processes, m["hosts"], m["cores_per_host"], other_cores)
        self.write_manifest(other_cores=other_cores, wall_time_kind=kind, cluster_wall_time=kind == records.CLUSTER)
        eset, rows = cfg.eval_set, self.epoch_rows
        last = rows[-1]
        return {
            "world": m["world"], "processes": processes, "epochs": cfg.epochs, "sync": cfg.sync, "seed": cfg.seed,
            "batch_per_node": cfg.batch_per_node, "batch_per_rank": cfg.batch_per_rank,
            f"{eset}_acc": last[f"{eset}_acc"], f"{eset}_loss": last[f"{eset}_loss"], "eval_set": eset,
            "mean_train_loss": last["mean_train_loss"], "mean_train_acc": last["mean_train_acc"],
            "global_wall_s": global_wall, "cluster_wall_time": kind == records.CLUSTER, "wall_time_kind": kind,
            "collapsed": bool(last["collapsed"]), "at_chance": bool(last["at_chance"]),
            "dead_conv10_frac": last.get("dead_conv10_frac"), **{f"init_{k}": v for k, v in init_diag.items()},
            "mean_epoch_s": sum(r["epoch_wall_s"] for r in rows) / len(rows), "eval_s": sum(r["eval_s"] for r in rows),
            "final_weight_digests": digests,
        }

    def complete(self, summary: dict, keep_checkpoint: bool = False) -> None:
        """The summary, then `completed`: if a write fails (a full disk) the record is not completed.
        Then the experiment's scaling_results.csv is rebuilt from its completed runs, so it never
        holds a row for a run that did not complete."""
        results.write_json(self.dir / "summary.json", summary)
        self.stop_heartbeat()
        if not self.write_manifest(COMPLETED, end_utc=provenance.utc_now()):
            raise RecordError(f"{self.dir} was marked failed by another process before it completed.")
        if not keep_checkpoint:
            (self.dir / "checkpoint.npz").unlink(missing_ok=True)
        import shutil

        shutil.rmtree(self.dir / ".progress", ignore_errors=True)  # the processes' live state (labtools.comm)
        try:
            rebuild_scaling_csv(self.dir.parent)
        except OSError as e:  # the run is complete; the table is derived and rebuilt by the next run
            print(f"labtools: {self.dir.parent / 'scaling_results.csv'} not updated ({e}); "
                  f"`labtools runs --rebuild` rebuilds it.", flush=True)


# ---------------------------------------------------------------------- the scaling table

def scaling_row(d: Path, m: dict, s: dict) -> dict:
    """One completed run in the paper's scaling_results.csv columns."""
    cfg, test = m.get("config", {}), s.get("eval_set", "test") == "test"
    return {"world": s["world"], "epochs": s["epochs"], "batch_per_node": s["batch_per_node"],
            "batch_per_rank": s["batch_per_rank"], "mean_train_loss": f"{s['mean_train_loss']:.4f}",
            "mean_train_acc_pct": f"{100 * s['mean_train_acc']:.2f}", "global_time_sec": f"{s['global_wall_s']:.2f}",
            "cifar_dir": cfg.get("cifar_dir"), "test_acc_pct": f"{100 * s['test_acc']:.2f}" if test else "",
            "test_loss": f"{s['test_loss']:.4f}" if test else "", "processes": s["processes"], "sync": s["sync"],
            "seed": s["seed"], "run_id": d.name}


def rebuild_scaling_csv(exp_dir) -> Path:
    """OUT/EXPERIMENT/scaling_results.csv: one row per completed run of the experiment, in order of
    completion. Under a lock, so concurrent runs never lose each other's rows; rows already there are
    kept (only runs not yet listed are read), rows of folders that are gone are dropped."""
    import csv

    exp_dir = Path(exp_dir)
    path = exp_dir / "scaling_results.csv"
    with open(exp_dir / ".scaling.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with open(path, newline="") as f:
                have = list(csv.DictReader(f))
        except (OSError, csv.Error):
            have = []
        folders = {p.parent.name for p in exp_dir.glob("*/manifest.json")}
        rows = [r for r in have if r.get("run_id") in folders]
        listed = {r["run_id"] for r in rows}
        new = []
        for d in sorted(exp_dir / n for n in folders - listed):
            if results.is_completed(d):
                m, s = results.read_json(d / "manifest.json"), results.read_json(d / "summary.json")
                new.append((m.get("end_utc") or "", d.name, scaling_row(d, m, s)))
        rows += [r for *_, r in sorted(new, key=lambda r: r[:2])]
        if rows != have or not path.exists():
            results.write_csv(path, rows, results.SCALING_COLUMNS)
    return path


# ---------------------------------------------------------------------- readers

def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _heartbeat_age(d: Path) -> float:
    hb = d / ".heartbeat"
    ref = hb if hb.exists() else d / "manifest.json"
    return time.time() - ref.stat().st_mtime


def status(run_dir) -> str:
    """completed | failed | interrupted | running | died (running on disk, but its heartbeat stopped)."""
    d = Path(run_dir)
    m = results.read_json(d / "manifest.json")
    st = m.get("status", RUNNING)
    if st == COMPLETED and not (d / "summary.json").is_file():
        return FAILED  # cannot happen with today's writer; an old or tampered record is not completed
    if st == RUNNING and (_heartbeat_age(d) > DEAD_AFTER_S or _all_gone(m)):
        return DIED
    return st


def alive(pid: int, started: float | None = None) -> bool:
    """The process exists, is not a zombie and (given the run's start time) is not a later process
    that got the same pid. os.kill(pid, 0) succeeds on a zombie, which a parent that does not reap
    (a container without an init, a supervisor) keeps for as long as it lives."""
    import psutil

    try:
        p = psutil.Process(pid)
        if p.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            return False
        return started is None or p.create_time() <= started + 5
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True  # exists, not ours to inspect


def _started(m: dict) -> float | None:
    """When the record's current processes started (the last resume, or the start)."""
    import datetime as dt

    utc = ((m.get("resumed") or [{}])[-1].get("utc")) or m.get("start_utc")
    try:
        return dt.datetime.fromisoformat(utc.replace("Z", "+00:00")).timestamp()
    except (AttributeError, ValueError):
        return None


def live_here(m: dict) -> list[int] | None:
    """The run's processes alive on this host; None if some of them ran on another host."""
    import socket

    pids = m.get("pids") or []
    if not pids or any(h != socket.gethostname() for h, _ in pids):
        return None
    t = _started(m)
    return [pid for _, pid in pids if alive(pid, t)]


def _all_gone(m: dict) -> bool:
    """Every process of the run ran on this host and none is alive any more (zombies are dead)."""
    return live_here(m) == []


def still_running(d: Path, m: dict) -> str:
    """Why a `running` record cannot be resumed yet, in one sentence: its live processes here, or,
    for processes on other hosts, how long until the heartbeat decides and the way out."""
    import socket

    live, age = live_here(m), _heartbeat_age(d)
    if live:
        return (f"--resume {d}: the run is still running here (pid {', '.join(map(str, live))} on host "
                f"{socket.gethostname()}); stop it first (kill {' '.join(map(str, live))}).")
    others = sorted({h for h, _ in (m.get("pids") or []) if h != socket.gethostname()})
    return (f"--resume {d}: the run may still be running on {', '.join(others) or 'another host'} (heartbeat "
            f"{int(age)}s ago); it counts as died when the heartbeat is {int(DEAD_AFTER_S)}s old, in "
            f"{max(0, int(DEAD_AFTER_S - age)) + 1}s. If nothing of it runs there any more, continue now with "
            f"`labtools train --resume {d} --force`.")


def listing(root="results", experiment: str | None = None) -> list[dict]:
    """Every run folder with its status, also the ones that did not complete (`labtools runs`)."""
    base = Path(root) / experiment if experiment else Path(root)
    rows = []
    for man in sorted(base.glob("*/manifest.json" if experiment else "*/*/manifest.json")):
        d = man.parent
        try:
            m = results.read_json(man)
            st = status(d)
        except (OSError, ValueError) as e:
            rows.append({"run": f"{d.parent.name}/{d.name}", "status": f"unreadable ({type(e).__name__})"})
            continue
        rows.append({"run": f"{d.parent.name}/{d.name}", "status": st,
                     "epochs": f"{m.get('epochs_done', 0)}/{m.get('config', {}).get('epochs', '?')}",
                     "np": m.get("world"), "P": m.get("processes"),
                     "checkpoint": (d / "checkpoint.npz").is_file(), "start_utc": m.get("start_utc"),
                     "error": m.get("error", "")})
    return rows


def format_listing(rows: list[dict]) -> str:
    if not rows:
        return "no runs"
    buf = io.StringIO()
    cols = ["run", "status", "epochs", "np", "P", "checkpoint", "start_utc", "error"]
    width = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols[:-1]}
    buf.write("  ".join(c.ljust(width[c]) for c in cols[:-1]) + "  error\n")
    for r in rows:
        buf.write("  ".join(str(r.get(c, "")).ljust(width[c]) for c in cols[:-1]) + f"  {r.get('error', '')}\n")
    return buf.getvalue()
