"""Process resource monitor: peak RSS, PSS and USS sampled in a background thread, CPU % from CPU-time deltas."""
from __future__ import annotations

import threading
import time

import psutil

MB = 2 ** 20
MEMORY_COLUMNS = ("peak_rss_mb", "peak_pss_mb", "peak_uss_mb")


class Monitor:
    """Per-process sampler. ``lap()`` returns (peak RSS MB, CPU %) since the previous lap;
    ``lap_all()`` the same as a dict with peak PSS and USS beside RSS.

    CPU % is process CPU time over wall time (100% = one core busy), as psutil and the paper
    report it; peak memory is sampled every ``interval`` seconds and at every lap.
    RSS counts every resident page the process maps, shared library pages (TensorFlow's, mapped by
    every rank on a host) in full in every process; PSS divides each shared page among the
    processes that map it, so the ranks' PSS add up to what they hold together; USS is the memory
    only this process holds (what its exit frees). PSS and USS come from psutil's
    ``memory_full_info`` (Linux /proc/PID/smaps_rollup); where the OS gives no PSS (or USS) the
    value is None.
    """

    def __init__(self, interval: float = 0.2):
        self.p = psutil.Process()
        self.interval = interval
        self._full = True  # memory_full_info works here (turned off at its first failure)
        self._peak = dict.fromkeys(MEMORY_COLUMNS, 0)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._t0 = time.perf_counter()
        self._cpu0 = self._cpu()
        self._thread = threading.Thread(target=self._loop, name="labtools-monitor", daemon=True)

    def _cpu(self) -> float:
        t = self.p.cpu_times()
        return t.user + t.system

    def _memory(self) -> dict:
        m = None
        if self._full:
            try:
                m = self.p.memory_full_info()
            except (psutil.AccessDenied, AttributeError, NotImplementedError, OSError):
                self._full = False
        m = m or self.p.memory_info()
        return {"peak_rss_mb": m.rss, "peak_pss_mb": getattr(m, "pss", None), "peak_uss_mb": getattr(m, "uss", None)}

    def _sample(self) -> None:
        m = self._memory()
        with self._lock:
            for k, v in m.items():
                if v is not None:
                    self._peak[k] = max(self._peak[k] or 0, v)
                elif not self._peak[k]:
                    self._peak[k] = None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "Monitor":
        self._span0 = (time.perf_counter(), self._cpu(), host_busy_seconds())
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def lap_all(self) -> dict:
        """{"peak_rss_mb", "peak_pss_mb", "peak_uss_mb", "cpu_pct"} since the previous lap (MB = 2**20
        bytes; PSS/USS None where the OS does not give them)."""
        self._sample()
        now, cpu = time.perf_counter(), self._cpu()
        with self._lock:
            peak, self._peak = self._peak, dict.fromkeys(MEMORY_COLUMNS, 0)
        pct = 100.0 * (cpu - self._cpu0) / max(now - self._t0, 1e-9)
        self._t0, self._cpu0 = now, cpu
        self._sample()
        return {**{k: (None if v is None else v / MB) for k, v in peak.items()}, "cpu_pct": pct}

    def memory_lap(self) -> dict:
        """Peak RSS/PSS/USS (MB) since the previous lap of either kind; the CPU clock is not reset."""
        self._sample()
        with self._lock:
            peak, self._peak = self._peak, dict.fromkeys(MEMORY_COLUMNS, 0)
        self._sample()
        return {k: (None if v is None else v / MB) for k, v in peak.items()}

    def lap(self) -> tuple[float, float]:
        d = self.lap_all()
        return d["peak_rss_mb"], d["cpu_pct"]

    def span(self) -> tuple[float, float, float]:
        """(wall s, this process's CPU s, CPU s of the whole host) since the monitor started:
        the host's share not spent by this run's processes is other load (records.wall_time_kind)."""
        t0, c0, h0 = self._span0
        return time.perf_counter() - t0, self._cpu() - c0, host_busy_seconds() - h0


def host_busy_seconds() -> float:
    """CPU seconds the whole host has spent busy (all cores; idle and I/O wait excluded)."""
    t = psutil.cpu_times()
    return sum(getattr(t, f) for f in t._fields if f not in ("idle", "iowait", "guest", "guest_nice"))
