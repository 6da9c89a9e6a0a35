"""A live terminal view of a long reproduction: one line per run started and finished, an overall bar.

The notebooks run inside papermill's kernels, where progress bars are widgets nobody sees in a
terminal. What the terminal can see is the results store: every run writes its folder (manifest
first, summary and `completed` last; labtools.record). ``StoreWatcher`` polls the store from a
thread and prints what appears, and a tqdm bar weighted by each planned run's work gives the time
left.
"""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from . import results


def work(cfg) -> float:
    """A planned run's cost in image-passes (training epochs x images plus evaluations): a weight for
    the time-left estimate, not a prediction."""
    train = cfg.limit_train or 50_000
    test = cfg.limit_test or 10_000
    return cfg.epochs * (train + test)


def describe(cfg: dict) -> str:
    """np, strategy and seed of a run, as a researcher names it."""
    from .profiles import strategy_name

    strat = strategy_name(cfg)
    batch = cfg.get("batch_per_node", 24)
    return f"np={cfg.get('np')} {strat}{'' if batch == 24 else f' batch/node={batch}'} seed={cfg.get('seed')}"


class StoreWatcher:
    """Print runs as they start and finish under a results root; advance `bar` by each finished run's work.

    Runs already in the store when the watcher starts are not reported (they are reused, not run).
    """

    def __init__(self, root, bar=None, poll: float = 1.0, out=None):
        # absolute: papermill changes the process's working directory while a notebook runs
        self.root, self.bar, self.poll = Path(root).resolve(), bar, poll
        self.out = out or sys.stdout
        self.seen: dict[Path, str] = {}
        self.started = self.finished = 0
        self.total_work = getattr(bar, "total", None) or 0
        self.done_work, self.t0 = 0.0, time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="labtools-live", daemon=True)
        self._known = set(results.run_dirs(self.root, completed=False)) if self.root.exists() else set()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)
        self.scan()  # the last run's end, if it came between two polls
        return False

    def _loop(self):
        while not self._stop.wait(self.poll):
            try:
                self.scan()
            except Exception:  # noqa: BLE001 - a folder being written: read it at the next poll; a view never stops a run
                pass

    def _print(self, line: str):
        if self.bar is not None and not self.bar.disable:
            self.bar.write(line, file=self.out)  # above the bar, which is redrawn below
        else:
            print(line, file=self.out, flush=True)

    def _left(self) -> str:
        """'; 12 runs done, ~4 min left' from the work done so far (for logs, where no bar is drawn)."""
        if not self.total_work or not self.done_work:
            return ""
        left = (time.monotonic() - self.t0) * max(self.total_work - self.done_work, 0) / self.done_work
        done = f"{self.finished} run{'s' if self.finished != 1 else ''} done"
        return f"; {done}, ~{left / 60:.0f} min left" if left >= 90 else f"; {done}, ~{left:.0f} s left"

    def scan(self):
        from .record import COMPLETED, RUNNING, status

        if not self.root.exists():
            return
        for d in results.run_dirs(self.root, completed=False):
            if d in self._known:
                continue
            st = status(d)
            before = self.seen.get(d)
            if before == st:
                continue
            m, s = results.read_record(d)
            cfg, name = m.get("config", {}), f"{d.parent.name}/{d.name}"
            if before is None:
                self.started += 1
                self._print(f"[run] started   {describe(cfg)} P={m.get('processes', '?')}  ({name})")
            if st != RUNNING:
                self.finished += 1
                from .config import RunConfig

                w = work(RunConfig.from_dict(cfg))
                self.done_work += w
                if st == COMPLETED and s:
                    ev = s.get("eval_set", "test")
                    self._print(f"[run] finished  {describe(cfg)}: {ev} acc {100 * s[f'{ev}_acc']:.1f}%, "
                                f"{s.get('global_wall_s', 0):.0f} s{self._left()}")
                else:
                    self._print(f"[run] {st:9s} {describe(cfg)}  ({name}){self._left()}")
                if self.bar is not None:
                    self.bar.update(min(w, self.bar.total - self.bar.n))
            self.seen[d] = st


def overall_bar(total_work: float, runs: int, desc: str = "reproduce"):
    """A terminal bar over the planned work (image-passes), labelled in runs."""
    from tqdm import tqdm

    return tqdm(total=total_work, desc=f"{desc} ({runs} runs)", unit="img", unit_scale=True, file=sys.stderr,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed} elapsed, ~{remaining} left",
                disable=None if runs else True, mininterval=2)

