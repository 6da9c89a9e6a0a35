"""Process resource monitor: peak RSS sampled in a background thread, CPU % from CPU-time deltas."""
from __future__ import annotations

import threading
import time

import psutil


class Monitor:
    """Per-process sampler. ``lap()`` returns (peak RSS MB, CPU %) since the previous lap.

    CPU % is process CPU time over wall time (100% = one core busy), as psutil and the paper
    report it; peak RSS is sampled every ``interval`` seconds and at every lap.
    """

    def __init__(self, interval: float = 0.2):
        self.p = psutil.Process()
        self.interval = interval
        self._peak = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._t0 = time.perf_counter()
        self._cpu0 = self._cpu()
        self._thread = threading.Thread(target=self._loop, name="labtools-monitor", daemon=True)

    def _cpu(self) -> float:
        t = self.p.cpu_times()
        return t.user + t.system

    def _sample(self) -> None:
        rss = self.p.memory_info().rss
        with self._lock:
            self._peak = max(self._peak, rss)

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

    def lap(self) -> tuple[float, float]:
        self._sample()
        now, cpu = time.perf_counter(), self._cpu()
        with self._lock:
            peak, self._peak = self._peak, 0
        pct = 100.0 * (cpu - self._cpu0) / max(now - self._t0, 1e-9)
        self._t0, self._cpu0 = now, cpu
        self._sample()
        return peak / 2**20, pct

    def span(self) -> tuple[float, float, float]:
        """(wall s, this process's CPU s, CPU s of the whole host) since the monitor started:
        the host's share not spent by this run's processes is other load (records.wall_time_kind)."""
        t0, c0, h0 = self._span0
        return time.perf_counter() - t0, self._cpu() - c0, host_busy_seconds() - h0


def host_busy_seconds() -> float:
    """CPU seconds the whole host has spent busy (all cores; idle and I/O wait excluded)."""
    t = psutil.cpu_times()
    return sum(getattr(t, f) for f in t._fields if f not in ("idle", "iowait", "guest", "guest_nice"))
