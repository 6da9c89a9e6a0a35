"""The thin layer over mpi4py, and the whole "one process fails, every process stops" protocol.

The protocol, in one place:
- A phase (some training steps, an evaluation) runs through ``Comm.phase``. A process that fails
  posts its message to every peer without blocking (``post_error``), then all meet in ``agree``; if
  any process failed, every process raises ``RankFailure`` naming the failed processes, so nobody
  waits forever in a collective.
- Inside a phase, ``check()`` (called before every step) stops early when a peer posted a failure
  (``PeerFailed``) or when this process received SIGTERM/SIGINT (``Interrupted``: the signal handler
  only sets a flag, so a signal never lands in the middle of a collective). A synchronous step that
  fails after its peers entered the step's Allreduce joins it with the error flag set
  (``fail_step``); the peers' step raises ``PEER_MARK``.
- If every failure is an interruption, the agreement raises ``RunInterrupted`` instead.
- Every blocking collective is watched: a wait longer than ``wait_limit`` seconds (a peer hung or
  gone under a launcher that does not clean up) names the processes that did not arrive (from their
  progress files and a TCP probe of their hosts), calls ``on_stuck`` and aborts the job; a hard exit
  follows if MPI_Abort does not return. Between collectives each process also probes the root, so a
  host cut off from the job ends within the limit too.
- A process killed outright is mpiexec's to clean up; `labtools.keeper` records it.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time

import numpy as np

PEER_MARK = "LABTOOLS_PEER_FAILED"


class RankFailure(RuntimeError):
    """Raised on every process when any process reported a failure."""


class RunInterrupted(RankFailure):
    """Raised on every process when the only failures were SIGTERM/SIGINT."""


class PeerFailed(Exception):
    """Another process reported a failure; stop this phase and go to the agreement point."""


class Interrupted(Exception):
    """This process received SIGTERM or SIGINT."""


INTERRUPTED = "interrupted by "
stop_signal: str | None = None  # set by the handler catch_signals installs


def catch_signals() -> None:
    """SIGTERM/SIGINT only set a flag, acted on at the next step or phase end (main thread only).

    A signal handler that raised would land anywhere, e.g. inside a collective, and leave the peers
    waiting. A second Ctrl-C stops at once.
    """
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(sig, _frame):
        global stop_signal
        if stop_signal and sig == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            raise KeyboardInterrupt
        stop_signal = signal.Signals(sig).name

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, handler)


class Comm:
    ERR_TAG = 7301
    STATE_TAG = 7302

    def __init__(self, mpi_comm=None, wait_limit: float | None = None):
        from mpi4py import MPI

        self.MPI = MPI
        self.c = mpi_comm if mpi_comm is not None else MPI.COMM_WORLD
        self.rank = self.c.Get_rank()
        self.size = self.c.Get_size()
        self.host = socket.gethostname()
        # processes sharing this host (for the default thread count)
        self.node = self.c.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_size = self.node.Get_size()
        self._posted = []
        self.wait_limit = wait_limit
        self.on_stuck = None  # called with one sentence and the culprits before a stuck wait aborts the job
        self._waiting: tuple[str, float] | None = None
        self._watch = None
        self._progress = None  # labtools.comm.Progress once the run folder is known (set_progress_dir)
        self._closed = False
        # Every process's (host, pid, probe port), known to all: at a stuck wait the watchdog asks,
        # outside MPI, whether a peer's host still answers (a TCP connect to its listening socket).
        self._probe = _listener() if self.size > 1 else None
        port = self._probe.getsockname()[1] if self._probe else 0
        self.peers = self.c.allgather((self.host, os.getpid(), port)) if self.size > 1 else [(self.host, os.getpid(), 0)]
        # MPI's shared-memory segments: removed only by MPI_Finalize, so a job that ends otherwise
        # removes them itself (abort here; the keeper when its worker is killed; a resume for a job killed whole)
        self.shm = shm_segments()
        from . import keeper

        keeper.tell(shm=self.shm)

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    # --------------------------------------------------------- agreement
    def post_error(self, msg: str) -> None:
        """Tell every other process, without blocking, that this one failed (they poll per step)."""
        self._posted = [self.c.isend(msg, dest=d, tag=self.ERR_TAG) for d in range(self.size) if d != self.rank]

    def error_pending(self) -> bool:
        return self.size > 1 and self.c.iprobe(source=self.MPI.ANY_SOURCE, tag=self.ERR_TAG)

    def check(self) -> None:
        """Before every step: stop on a peer's posted failure or on a signal to this process."""
        if stop_signal:
            raise Interrupted(f"{INTERRUPTED}{stop_signal} on host {self.host}")
        if self.error_pending():
            raise PeerFailed()

    def agree(self, error: BaseException | str | None) -> None:
        """Collective: raise RankFailure everywhere if any process passed an error.

        A failed process must have called post_error first; here every process also consumes the
        notices addressed to it, so a pool of engines is clean for the next run.
        """
        msg = None if error is None else (error if isinstance(error, str) else f"{type(error).__name__}: {error}")
        msgs = self.allgather(msg)
        failed = [i for i, m in enumerate(msgs) if m]
        if not failed:
            return
        for _ in range(len([i for i in failed if i != self.rank])):
            self.c.recv(source=self.MPI.ANY_SOURCE, tag=self.ERR_TAG)
        for req in self._posted:
            req.wait()
        self._posted = []
        detail = "; ".join(f"process {i}: {msgs[i]}" for i in failed)
        only_signals = all(INTERRUPTED in msgs[i] for i in failed)
        raise (RunInterrupted if only_signals else RankFailure)(f"{len(failed)} of {self.size} processes "
                                                                f"{'stopped' if only_signals else 'failed'} - {detail}")

    def phase(self, fn, *args):
        """Run this process's part of a phase, then agree; every process raises if any one failed."""
        err = out = None
        try:
            out = fn(*args)
        except PeerFailed:
            pass
        except Exception as e:  # noqa: BLE001 - reported to every process, then raised as RankFailure
            text = getattr(e, "message", None) or str(e)  # a TensorFlow OpError keeps its own text in .message
            if PEER_MARK not in text:  # else a peer failed inside a synchronous step: its message comes in agree
                err = f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"
                self.post_error(err)
        self.agree(err)
        return out

    def fail_step(self, n: int) -> None:
        """Join the current step's Allreduce of n values plus the error flag, with the flag set."""
        buf = np.zeros(n + 1, np.float32)
        buf[-1] = 1.0
        self.allreduce_array(buf)

    @staticmethod
    def raise_if_peer_failed(flat: np.ndarray) -> None:
        """After a synchronous step's Allreduce: the last value counts the processes that failed."""
        if flat[-1] > 0:
            raise RankFailure(f"{PEER_MARK}: {int(flat[-1])} process(es) failed during a synchronous step")

    def abort(self, code: int = 1) -> None:
        """MPI_Abort, and a hard exit ABORT_GRACE_S later if it has not returned: MPI_Abort asks the
        launcher to end the job, which hangs when the launcher cannot be reached (a lost host)."""
        sys.stdout.flush()
        sys.stderr.flush()
        _exit_later(code, ABORT_GRACE_S)
        from .keeper import remove_segments

        remove_segments(self.shm)  # the job is ending: every process that maps them keeps its mapping
        self.c.Abort(code)
        os._exit(code)

    # --------------------------------------------------------- bounded waits
    def waiting(self, what: str):
        """Marks a blocking collective for the watchdog (here, and the in-graph Allreduce's step)."""
        return _Waiting(self, what)

    def set_progress_dir(self, d) -> None:
        """Each process writes its state (waiting in which collective since when, last sign of life)
        to d/pNNNN, so a stuck wait can name the processes that did not arrive (labtools.comm.Progress)."""
        if self.size > 1 and self.wait_limit:
            try:
                self._progress = Progress(d, self.rank, self.host)
            except OSError:
                self._progress = None  # the message then names only what the probe finds

    def release(self) -> None:
        """End the watchdog and close the progress file and the probe socket (a notebook engine runs
        many trainings, each with its own Comm)."""
        self._closed = True
        if self._progress:
            self._progress.close()
            self._progress = None
        if self._probe:
            try:
                self._probe.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread (a close alone does not)
            except OSError:
                pass
            self._probe.close()
            self._probe = None

    def _watchdog(self) -> None:
        root_seen = time.monotonic()
        while not self._closed:
            time.sleep(min(1.0, self.wait_limit / 4))
            if self._progress:
                self._progress.beat()
            w = self._waiting
            if w and time.monotonic() - w[1] > self.wait_limit:
                self._stuck(f"waited over {self.wait_limit:g}s in {w[0]}", self.not_arrived())
            # Outside a collective too, a process away from the root asks now and then whether the
            # root still answers: a host cut off from the job would otherwise compute on alone
            # until its next collective (a whole epoch, for epoch-average).
            if self.rank != 0 and self._probe and time.monotonic() - root_seen > min(5.0, self.wait_limit / 2):
                host, pid, port = self.peers[0]
                answer = _reachable(host, port)
                if answer in ("yes", None):
                    root_seen = time.monotonic()
                elif time.monotonic() - root_seen > self.wait_limit and not self._closed:
                    says = (f"process 0 (host {host}, pid {pid}) " + ("is unreachable: host {h} does not answer from {me}"
                            if answer == "no" else "is gone: its host answers, its process does not")
                            .format(h=host, me=self.host))
                    # not recorded: the root (or a peer waiting in a collective) records the fault as it sees it
                    self._stuck(f"has not reached the root for over {self.wait_limit:g}s",
                                [{"rank": 0, "host": host, "pid": pid, "kind": "unreachable" if answer == "no" else "gone",
                                  "says": says}], record=False)

    def _stuck(self, what: str, culprits: list[dict], record: bool = True) -> None:
        """Say who did not arrive, record it, end the job (for sure: a hard exit follows)."""
        _exit_later(1, ABORT_GRACE_S + 3)  # whatever happens below (the record's disk, MPI_Abort), the end is sure
        named = "; ".join(c["says"] for c in culprits[:4]) + \
            (f"; and {len(culprits) - 4} more (the run's manifest lists them)" if len(culprits) > 4 else "")
        msg = f"process {self.rank} (host {self.host}) {what}: {named}. Ending the job."
        print(f"labtools: {msg}", file=sys.stderr, flush=True)
        if self.on_stuck and record:
            if self.rank != 0:
                time.sleep(1)  # the root's view is the record's when both see the fault
            try:
                self.on_stuck(msg, culprits)
            except Exception:  # noqa: BLE001 - the abort below matters more than the record
                pass
        self.abort(1)

    def not_arrived(self) -> list[dict]:
        """The peers this process waits for, each with one clause saying why: not responding (no sign
        of life: stopped, hung or its host gone), unreachable (alive per its file, but its host does not
        answer from here), still busy elsewhere (has not reached the collective), or no word at all."""
        from concurrent.futures import ThreadPoolExecutor

        states = self._progress.read_all(self.size) if self._progress else {}
        now, stale = time.time(), max(3.0, min(self.wait_limit / 2, 10.0))  # a live process beats every second
        with ThreadPoolExecutor(8) as pool:  # each probe waits up to 1.5 s for a host that does not answer
            reach = list(pool.map(lambda hp: _reachable(*hp), [(h, port) for h, _, port in self.peers]))
        out, unknown = [], []
        for r, (host, pid, port) in enumerate(self.peers):
            if r == self.rank:
                continue
            st = states.get(r)
            who = f"process {r} (host {host}, pid {pid})"
            if reach[r] == "no":
                says = f"{who} is unreachable: host {host} does not answer from {self.host}"
                kind = "unreachable"
            elif reach[r] == "refused":
                says, kind = f"{who} is gone: its host answers, its process does not", "gone"
            elif st is None:
                unknown.append(r)
                continue
            elif now - st["beat"] > stale:
                says = f"{who} did not arrive: no sign of life for {now - st['beat']:.0f}s (stopped or hung)"
                kind = "not responding"
            elif st["what"] is None:
                says = f"{who} did not arrive: busy {now - st['since']:.0f}s since its last collective"
                kind = "busy"
            else:
                continue  # waiting too, alive and reachable: not the culprit
            out.append({"rank": r, "host": host, "pid": pid, "kind": kind, "says": says})
        if not out:  # nobody could be told apart: say so, never blame a peer that may have arrived
            out.append({"rank": None, "host": None, "pid": None, "kind": "unknown",
                        "says": f"one of processes {', '.join(map(str, unknown))} is stuck or gone (no progress "
                                f"files yet to tell which)" if unknown else "every peer is alive, reachable and "
                                "waiting too (collectives out of step)"})
        return out

    # --------------------------------------------------------- collectives
    def barrier(self) -> None:
        with self.waiting("barrier"):
            self.c.Barrier()

    def bcast(self, obj, root: int = 0):
        with self.waiting("bcast"):
            return self.c.bcast(obj, root=root)

    def gather(self, obj, root: int = 0):
        with self.waiting("gather"):
            return self.c.gather(obj, root=root)

    def scatter(self, objs, root: int = 0):
        with self.waiting("scatter"):
            return self.c.scatter(objs, root=root)

    def gather_states(self, states: dict[int, list[np.ndarray]]) -> list[dict] | None:
        """``gather`` of each process's {logical rank: [arrays]} for a checkpoint, the arrays sent as raw
        buffers into arrays the root allocates: the root holds each received array once, where a
        pickled gather held the pickle, its receive buffer and the arrays (+50 MB at np = 2). An
        array shared by several ranks (``Worker.local_states``) is sent once."""
        index: dict[int, int] = {}  # id(array) -> its place in uniq
        uniq: list[np.ndarray] = []
        refs = {r: [index.setdefault(id(a), len(index)) for a in parts] for r, parts in states.items()}
        for parts in states.values():  # first sightings, in the order index numbered them
            for a in parts:
                if index[id(a)] == len(uniq):
                    uniq.append(np.ascontiguousarray(a))
        meta = self.gather((refs, [(u.dtype.str, u.shape) for u in uniq]))
        if not self.is_root:
            with self.waiting("checkpoint gather"):
                for u in uniq:
                    self.c.Send(u, dest=0, tag=self.STATE_TAG)
            return None
        out = []
        for p, (prefs, specs) in enumerate(meta):
            arrays = uniq
            if p != self.rank:
                arrays = [np.empty(shape, dtype) for dtype, shape in specs]
                with self.waiting("checkpoint gather"):
                    for a in arrays:
                        self.c.Recv(a, source=p, tag=self.STATE_TAG)
            out.append({r: [arrays[i] for i in ids] for r, ids in prefs.items()})
        return out

    def allgather(self, obj):
        with self.waiting("allgather"):
            return self.c.allgather(obj)

    def allreduce_array(self, a: np.ndarray) -> np.ndarray:
        """Elementwise sum over processes of a contiguous numpy buffer (no pickling)."""
        a = np.ascontiguousarray(a)
        if self.size == 1:
            return a.copy()
        out = np.empty_like(a)
        with self.waiting("Allreduce"):
            self.c.Allreduce(a, out, op=self.MPI.SUM)
        return out

    def allreduce_inplace(self, a: np.ndarray) -> None:
        """Elementwise sum over processes, written over a (contiguous, writeable) buffer."""
        if self.size > 1:
            with self.waiting("Allreduce"):
                self.c.Allreduce(self.MPI.IN_PLACE, a, op=self.MPI.SUM)

    def max(self, x: float) -> float:
        with self.waiting("allreduce"):
            return self.c.allreduce(x, op=self.MPI.MAX)

    def sum(self, x):
        with self.waiting("allreduce"):
            return self.c.allreduce(x, op=self.MPI.SUM)

    def library_version(self) -> str:
        return self.MPI.Get_library_version().strip().splitlines()[0]


class _Waiting:
    """Marks a blocking collective for the watchdog (two attribute writes: cheap enough per step)."""

    __slots__ = ("comm", "what")

    def __init__(self, comm: Comm, what: str):
        self.comm, self.what = comm, what

    def __enter__(self):
        c = self.comm
        if c.wait_limit and c.size > 1:
            if c._watch is None:
                c._watch = threading.Thread(target=c._watchdog, name="labtools-watchdog", daemon=True)
                c._watch.start()
            c._waiting = (self.what, time.monotonic())
            if c._progress:
                c._progress.enter(self.what)

    def __exit__(self, *exc):
        c = self.comm
        if c._waiting is not None:
            c._waiting = None
            if c._progress:
                c._progress.leave()


ABORT_GRACE_S = 3.0


def shm_segments() -> list[str]:
    """The /dev/shm files this process maps (MPICH's mpich_shm_* segments), not yet unlinked."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split(None, 5)[5].strip() for line in f if "/dev/shm/" in line}
    except (OSError, IndexError):
        return []
    return sorted(p for p in paths if p.startswith(MPI_SHM) and not p.endswith("(deleted)"))


MPI_SHM = ("/dev/shm/mpich_", "/dev/shm/vader_segment", "/dev/shm/ompi")


def _exit_later(code: int, after: float) -> None:
    """End this process for sure `after` seconds from now (a daemon thread; os._exit works while the
    main thread is blocked in C)."""
    def go():
        time.sleep(after)
        os._exit(code)

    threading.Thread(target=go, name="labtools-hard-exit", daemon=True).start()


def _listener():
    """A listening TCP socket for the peers' reachability probes: a connect that completes is all a
    probe needs; a daemon thread accepts and closes each one, so the queue never fills."""
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("0.0.0.0", 0))
        s.listen(64)
    except OSError:
        return None

    def accept():
        while True:
            try:
                conn, _ = s.accept()
                conn.close()
            except OSError:
                return  # closed (Comm.release)

    threading.Thread(target=accept, name="labtools-probe", daemon=True).start()
    return s


def _reachable(host: str, port: int, timeout: float = 1.5) -> str | None:
    """A TCP connect to the peer's probe port: "yes" (its process holds it), "refused" (the host
    answers, the process is gone), "no" (the host does not answer); None: unknown (no port)."""
    if not port:
        return None
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return "yes"
    except ConnectionRefusedError:
        return "refused"
    except OSError:
        return "no"


class Progress:
    """This process's state in DIR/pNNNN, one JSON line rewritten in place: the collective it waits in
    (or None) since when, and its last sign of life (`beat`, written by the watchdog every second)."""

    SIZE = 256

    def __init__(self, d, rank: int, host: str):
        from pathlib import Path

        self.dir = Path(d)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.dir / f"p{rank:04d}", os.O_RDWR | os.O_CREAT, 0o644)
        self.lock = threading.Lock()
        self.state = {"host": host, "pid": os.getpid(), "what": None, "since": time.time(), "beat": time.time()}
        self._write()

    def _write(self) -> None:
        import json

        with self.lock:
            try:
                if self.fd >= 0:
                    os.pwrite(self.fd, json.dumps(self.state).encode().ljust(self.SIZE), 0)
            except OSError:
                pass  # a full disk: the watchdog then reads an older state

    def enter(self, what: str) -> None:
        self.state.update(what=what, since=time.time(), beat=time.time())
        self._write()

    def leave(self) -> None:
        self.state.update(what=None, since=time.time(), beat=time.time())
        self._write()

    def beat(self) -> None:
        self.state["beat"] = time.time()
        self._write()

    def close(self) -> None:
        with self.lock:
            os.close(self.fd)
            self.fd = -1

    def read_all(self, size: int) -> dict[int, dict]:
        import json

        out = {}
        for r in range(size):
            try:
                # the first JSON object: a shorter state rewritten over a longer one leaves its tail
                out[r] = json.JSONDecoder().raw_decode((self.dir / f"p{r:04d}").read_bytes().decode().strip())[0]
            except (OSError, ValueError):
                pass
        return out


def default_threads(comm: Comm) -> int:
    """Cores on this host shared evenly among the processes on it (at least 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // comm.local_size)
