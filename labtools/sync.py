"""Sync strategies: how the N logical ranks' models are kept in agreement.

- EpochAverage (the paper's §3.2.3): each rank trains a whole epoch on its shard alone, then the
  weights are gathered to the root, averaged and broadcast. It is local SGD with H = one epoch.
- LocalSGD(H): the same average every H steps.
- AllReduce: Horovod-style synchronous SGD; the gradient of every step is averaged over all
  samples of all ranks (one fused Allreduce per step), so all ranks always hold the same model.

Each strategy's ``train_epoch`` runs one epoch for this process's ranks and returns per-rank
statistics; phases end at an agreement point (``Comm.phase``) before any collective.
"""
from __future__ import annotations

import time

import numpy as np

from . import data as D
from .comm import PeerFailed, RankFailure
from .config import steps_per_call
from .worker import Worker


class RankStats:
    """Per logical rank, per epoch accumulators."""

    __slots__ = ("loss", "correct", "n", "seconds", "steps", "gnorm")

    def __init__(self):
        self.loss = self.correct = self.seconds = self.gnorm = 0.0
        self.n = self.steps = 0

    def add(self, loss, correct, n, seconds, gnorm):
        self.loss += loss
        self.correct += correct
        self.n += n
        self.seconds += seconds
        self.steps += 1
        self.gnorm += gnorm


def run_phase(w: Worker, fn, *args):
    """This process's part of a phase, then agreement (the protocol is labtools.comm's)."""
    return w.comm.phase(fn, *args)


class Strategy:
    name = "base"

    def start(self, w: Worker) -> None:
        """Called once before the first epoch."""

    def train_epoch(self, w: Worker, epoch: int) -> tuple[dict, dict]:
        raise NotImplementedError


class LocalSGD(Strategy):
    """Average weights across all N ranks every H steps (H = None: once per epoch)."""

    name = "local-sgd"

    def __init__(self, every: int | None, average_impl: str = "gather-bcast", opt_state: str = "keep"):
        self.every, self.average_impl, self.opt_state = every, average_impl, opt_state

    def train_epoch(self, w: Worker, epoch: int):
        stats = {r: RankStats() for r in w.ranks}
        orders = {r: D.epoch_order(w.shards[r], epoch, w.cfg.seed, r, w.cfg.shuffle) for r in w.ranks}
        H = self.every or w.steps_per_epoch
        info = {"sync_s": 0.0, "syncs": 0, "divergence": 0.0}
        for s0 in range(0, w.steps_per_epoch, H):
            s1 = min(s0 + H, w.steps_per_epoch)
            run_phase(w, self._local_steps, w, epoch, s0, s1, orders, stats)
            t = time.perf_counter()
            info["divergence"] = self.average(w)
            info["sync_s"] += time.perf_counter() - t
            info["syncs"] += 1
        return stats, info

    @staticmethod
    def _local_steps(w: Worker, epoch, s0, s1, orders, stats):
        b, per_call = w.b, steps_per_call()
        for r in w.ranks:
            w.activate(r)
            order, st = orders[r], stats[r]
            s = s0
            while s < s1:
                # up to per_call steps in one graph call; a shorter (last) batch goes alone
                idxs = [order[s * b:(s + 1) * b]]
                if len(idxs[0]) == 0:
                    break
                while len(idxs) < per_call and s + len(idxs) < s1:
                    nxt = order[(s + len(idxs)) * b:(s + len(idxs) + 1) * b]
                    if len(nxt) != len(idxs[0]):
                        break
                    idxs.append(nxt)
                w.check(r, epoch)
                t = time.perf_counter()
                losses, corrects, norms = w.train_steps(idxs, epoch, s)
                dt = (time.perf_counter() - t) / len(idxs)
                for idx, loss, correct, gn in zip(idxs, losses.tolist(), corrects.tolist(), norms.tolist()):
                    st.add(loss, correct, len(idx), dt, gn)
                s += len(idxs)

    def average(self, w: Worker) -> float:
        """Average weights (and optimizer state if asked) over all N ranks; return the mean
        relative distance of each rank's weights from the average, measured before averaging."""
        w.flush()
        W = np.stack([w.states[r][0] for r in w.ranks])  # (k, n_params) float32
        avg = self._mean(w, W)
        div_local = float(sum(np.linalg.norm(W[i] - avg) for i in range(len(W))))
        divergence = w.comm.sum(div_local) / w.N / max(float(np.linalg.norm(avg)), 1e-12)
        new_opt = None
        if self.opt_state == "average":
            O = np.stack([w.states[r][1] for r in w.ranks])
            o_avg = self._mean(w, O)
            new_opt = {r: o_avg for r in w.ranks}
        elif self.opt_state == "reset":
            new_opt = {r: np.zeros_like(w.states[r][1]) for r in w.ranks}
        w.set_all(avg, new_opt)
        return divergence

    def _mean(self, w: Worker, M: np.ndarray) -> np.ndarray:
        if self.average_impl == "allreduce":
            total = w.comm.allreduce_array(M.sum(axis=0, dtype=np.float64))
            return (total / w.N).astype(np.float32)
        # The paper's pattern: comm.gather() to the root, average there, comm.bcast() back.
        gathered = w.comm.gather(M)
        avg = None
        if w.comm.is_root:
            avg = (np.concatenate(gathered).sum(axis=0, dtype=np.float64) / w.N).astype(np.float32)
        return w.comm.bcast(avg)


class EpochAverage(LocalSGD):
    name = "epoch-average"

    def __init__(self, average_impl: str = "gather-bcast", opt_state: str = "keep"):
        super().__init__(None, average_impl, opt_state)


class AllReduce(Strategy):
    """Synchronous SGD. A process fuses its k ranks' batches into one forward/backward pass: the
    summed gradient is the same as k separate ones, and keyed dropout gives each sample the mask it
    would get on its own rank, so P processes compute what N real ranks would."""

    name = "allreduce"

    def train_epoch(self, w: Worker, epoch: int):
        stats = {r: RankStats() for r in w.ranks}
        orders = {r: D.epoch_order(w.shards[r], epoch, w.cfg.seed, r, w.cfg.shuffle) for r in w.ranks}
        run_phase(w, self._steps, w, epoch, orders, stats)
        w.gather_shards()  # every process agreed the epoch went well: all are here
        w.share_current()
        return stats, {"sync_s": 0.0, "syncs": w.steps_per_epoch, "divergence": 0.0}

    @staticmethod
    def _steps(w: Worker, epoch, orders, stats):
        b, per_call, S = w.b, steps_per_call(), w.steps_per_epoch

        def parts(s):
            return [orders[r][s * b:(s + 1) * b] for r in w.ranks]

        s = 0
        while s < S:
            t = time.perf_counter()
            try:
                # up to per_call steps in one call, while this process's batches keep their sizes
                chunk = [parts(s)]
                sizes = [len(p) for p in chunk[0]]
                while len(chunk) < per_call and s + len(chunk) < S and [len(p) for p in parts(s + len(chunk))] == sizes:
                    chunk.append(parts(s + len(chunk)))
                for r in w.ranks:
                    w.check(r, epoch)
                x, y, k = w.batch(np.concatenate([np.concatenate(ps) for ps in chunk]), epoch)
                n, B = len(chunk), sum(sizes)
                x, y, k = x.reshape(n, B, *x.shape[1:]), y.reshape(n, B), k.reshape(n, B)
            except PeerFailed:
                raise
            except Exception:
                w.post_step_failure()  # peers are (or will be) inside step s's Allreduce
                raise
            with w.comm.waiting("a synchronous step's Allreduce"):
                pers, corrects, norms = w.sync_steps(x, y, k, epoch, s)
            dt = (time.perf_counter() - t) / n / len(w.ranks)
            for per, correct, gn in zip(pers, corrects, norms.tolist()):
                o = 0
                for r, size in zip(w.ranks, sizes):
                    if size:
                        stats[r].add(float(per[o:o + size].sum()), float(correct[o:o + size].sum()), size, dt, gn)
                    o += size
            s += n


def make_strategy(cfg) -> Strategy:
    if cfg.sync == "allreduce":
        return AllReduce()
    if cfg.sync == "local-sgd":
        return LocalSGD(cfg.sync_every, cfg.average_impl, cfg.opt_state)
    return EpochAverage(cfg.average_impl, cfg.opt_state)


__all__ = ["AllReduce", "EpochAverage", "LocalSGD", "RankFailure", "make_strategy", "run_phase"]
