"""labtools.train.run(config): the per-process training loop, the same under mpiexec, ipyparallel or plain Python.

setup: check the input (one sentence, nothing written), find and verify CIFAR-10, build this
process's logical ranks, open the run record (a new folder, or the one being resumed);
loop: per epoch the sync strategy trains, the processes evaluate the synchronized model together,
the root records the epoch and a checkpoint; a signal or a failure stops every process;
save: final digests, summary, scaling row, and `completed` last (labtools.record owns every file).
"""
from __future__ import annotations

import hashlib
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from . import data as D
from . import keeper, records
from .comm import Comm, RankFailure, RunInterrupted, default_threads
from .config import ConfigError, RunConfig, sharded_adam, steps_per_call
from .metrics import is_at_chance, is_collapsed
from .record import INTERRUPTED, FAILED, RunRecord, check_free, check_writable, describe


def check_world(cfg: RunConfig, processes: int, n_train: int) -> int:
    """World size N for this launch, or ConfigError."""
    world = cfg.np or processes
    if cfg.val_split and cfg.val_split >= n_train:
        raise ConfigError(f"--val-split {cfg.val_split} leaves no training images out of {n_train}.")
    n_train -= cfg.val_split
    if world % processes:
        raise ConfigError(f"--np {world} is not a multiple of the {processes} MPI processes; "
                          f"each process must host the same number of logical ranks.")
    if world > n_train:
        raise ConfigError(f"--np {world} is larger than the {n_train} training images; "
                          f"every rank needs at least one image.")
    return world


def _set_threads(n: int) -> None:
    from .cli import import_tensorflow  # the first import of TensorFlow here: without its start-up lines

    tf = import_tensorflow()

    try:
        tf.config.threading.set_intra_op_parallelism_threads(n)
        tf.config.threading.set_inter_op_parallelism_threads(1 if n == 1 else 2)
    except RuntimeError:
        # TensorFlow is already initialised in this process (a reused notebook engine, a test
        # session): its pools cannot change. Say so when that is not what was asked: results with
        # more intra-op threads differ in round-off (e.g. 1e-4 of the weights after 32 Adam steps).
        have = tf.config.threading.get_intra_op_parallelism_threads()
        if have != n:
            import warnings

            now = str(have) if have else "the default (all cores)"
            warnings.warn(f"TensorFlow already runs with {now} intra-op threads in this process; "
                          f"{n} requested takes effect only in a fresh process", RuntimeWarning, stacklevel=2)


def _root_decides(comm: Comm, fn, share: bool = True):
    """fn() on the root; its ConfigError/DataError raised everywhere, its result everywhere (share)
    or on the root only."""
    out = err = None
    if comm.is_root:
        try:
            out = fn()
        except (ConfigError, D.DataError, OSError) as e:
            err = (type(e).__name__, str(e))
    err, shared = comm.bcast((err, out if share else None))
    if err:
        raise (D.DataError if err[0] == "DataError" else ConfigError)(err[1])
    return shared if share else out


def _prepare(cfg: RunConfig, comm: Comm):
    """Root finds, downloads if needed, and verifies the data; everyone then checks the same path."""
    path = _root_decides(comm, lambda: str(D.verify(D.find_cifar_dir(cfg.cifar_dir))))
    local_err = None if all((Path(path) / f).is_file() for f in D.MD5) else \
        f"CIFAR-10 folder {path} (verified on the root) is missing on host {comm.host}; every node needs it at the same path."
    bad = [m for m in comm.allgather(local_err) if m]
    if bad:
        raise D.DataError(bad[0])
    return path, min(cfg.limit_train or D.TRAIN_SIZE, D.TRAIN_SIZE)


def _recorded(run_dir, key):
    from . import results

    try:
        return results.read_json(Path(run_dir) / "manifest.json").get(key)
    except (OSError, ValueError, AttributeError):
        return None  # reported properly when the record is opened


def _check_start(cfg: RunConfig, resume, force: bool):
    """Root, before TensorFlow and the data: a new run can be written (--out, a free --run-id), or the
    run to resume can be continued (its status, config, code and a whole checkpoint). Returns
    (record, checkpoint) for a resume, None otherwise."""
    if resume is None:
        check_writable(cfg.out, cfg.experiment)
        check_free(cfg.out, cfg.experiment, cfg.run_id)
        return None
    rec = RunRecord.open(resume, cfg if cfg.np else None, force=force)
    rec.remove_segments()  # a job killed whole (kill -9, OOM) left its MPI segments behind
    ck = rec.load_checkpoint()
    if ck is None:
        done = rec.manifest.get("epochs_done") or 0
        print(f"labtools: {rec.dir} has no checkpoint, so the run starts again from epoch 1"
              + (f" (the {done} epoch(s) recorded are trained again)." if done else "."), file=sys.stderr, flush=True)
    return rec, ck


# Called on the root after every epoch with (epochs done, epochs, the epoch's record row): how an
# ipyparallel engine reports progress to the notebook's bar (labtools.cluster); None elsewhere.
on_epoch = None


def _say(cfg: RunConfig, line: str) -> None:
    if not cfg.quiet:
        print(line, flush=True)


# ---------------------------------------------------------------------- setup

def _kernels(cfg: RunConfig, comm: Comm, w) -> dict:
    a = w.kernels  # agreed by every process (labtools.kernels)
    return {"adam": a.reason("fused_adam") if cfg.optimizer == "adam" else "none (SGD)",
            "allreduce": "none (no per-step Allreduce)" if cfg.sync != "allreduce" or comm.size == 1
            else a.reason("mpi_op") + (", Adam sharded over the 2 processes" if w.sharded else ""),
            "steps_per_call": steps_per_call(), "processes": a.processes}


def _open_record(cfg: RunConfig, comm: Comm, w, resume, threads: int, early=None) -> tuple[RunRecord, dict]:
    """The root creates (or reopens) the run folder; everyone gets its path and the progress so far
    (epochs done, wall time, ...); on resume every logical rank gets its checkpointed state back."""
    launch = dict(world=w.N, processes=comm.size, ranks_per_process=w.k, hosts=comm.gather(comm.host),
                  pids=comm.gather((comm.host, os.getpid())), cores_per_host=comm.gather((comm.host, os.cpu_count())),
                  mpi_library=comm.library_version(), n_train=len(w.ytr), n_eval=len(w.yte),
                  steps_per_epoch=w.steps_per_epoch, threads=threads, kernels=_kernels(cfg, comm, w))
    shm = comm.gather([(comm.host, p) for p in comm.shm])

    def root_open():
        if resume is None:
            default = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-np{w.N}-{cfg.science_key()}-s{cfg.seed}"
            rec = RunRecord.create(cfg.out, cfg.experiment, cfg.run_id, default)
            rec.start(describe(cfg, **launch), shm=sum(shm, []))
            return rec, None, {"epochs_done": 0, "wall_s": 0.0, "init_diag": None}
        rec, ck = early  # opened and its checkpoint read before any work (_check_start)
        meta, states = ck if ck else ({"epochs_done": 0, "wall_s": 0.0, "init_diag": None}, {})
        facts = describe(cfg, **launch)
        rec.start(facts, resumed={"utc": facts["start_utc"], "from_epoch": meta["epochs_done"], "processes": comm.size},
                  shm=sum(shm, []))
        return rec, states, meta

    opened = _root_decides(comm, root_open, share=False)
    rec_path = comm.bcast(str(opened[0].dir) if comm.is_root else None)
    rec = opened[0] if comm.is_root else RunRecord(rec_path)
    keeper.tell(rec.dir)
    comm.set_progress_dir(rec.dir / PROGRESS)
    if comm.is_root:
        _say(cfg, f"[Root] Run folder: {rec.dir}")
    progress = comm.bcast(opened[2] if comm.is_root else None)
    states = opened[1] if comm.is_root else None
    if resume is not None and progress["epochs_done"]:
        parts = [{r: states[r] for r in range(p * w.k, (p + 1) * w.k)} for p in range(comm.size)] if comm.is_root else None
        w.restore(comm.scatter(parts))
    return rec, progress


# ---------------------------------------------------------------------- one epoch

def _train_epoch(cfg, comm, w, strategy, epoch, mon) -> tuple[dict, dict, float]:
    t0 = time.perf_counter()
    stats, info = strategy.train_epoch(w, epoch)
    t_train = time.perf_counter() - t0
    mem = mon.lap_all()  # peak_rss_mb, peak_pss_mb, peak_uss_mb, cpu_pct
    rows = {}
    for r in w.ranks:
        st = stats[r]
        rows[r] = {
            "rank": r, "epoch": epoch + 1, "train_loss": st.loss / max(st.n, 1),
            "train_acc": st.correct / max(st.n, 1), "samples": st.n, "epoch_s": st.seconds,
            "mean_step_s": st.seconds / max(st.steps, 1), "img_per_s": st.n / max(st.seconds, 1e-9),
            "grad_norm": st.gnorm / max(st.steps, 1), "peak_rss_mb": mem["peak_rss_mb"], "cpu_pct": mem["cpu_pct"],
            "process": comm.rank, "process_epoch_s": t_train, "peak_pss_mb": mem["peak_pss_mb"],
            "peak_uss_mb": mem["peak_uss_mb"],
        }
        _say(cfg, f"[Rank {r}] Epoch {epoch + 1}/{cfg.epochs} loss={rows[r]['train_loss']:.4f} "
                  f"acc={100 * rows[r]['train_acc']:.2f}% time={st.seconds:.2f}s")
    return rows, info, t_train


def _evaluate_epoch(cfg, comm, w, epoch, rows, info, t_train, mon) -> tuple[dict | None, list | None]:
    """Evaluate the synchronized model together; the root gets the epoch row and all rank rows."""
    t1 = time.perf_counter()
    ev = comm.phase(w.evaluate)
    tl, tc = comm.sum(ev[0]), comm.sum(ev[1])
    diag = w.dead_relus() if (cfg.diagnostics and comm.is_root) else {}
    t_eval = time.perf_counter() - t1
    # an epoch's peak memory covers its evaluation too (the last epoch's would be lost otherwise)
    for k, v in mon.memory_lap().items():
        for row in rows.values():
            row[k] = v if row[k] is None else row[k] if v is None else max(row[k], v)
    all_rows = comm.gather(rows)
    slow = comm.max(t_train)
    if not comm.is_root:
        return None, None
    flat = [row for part in all_rows for row in part.values()]
    eset, n = cfg.eval_set, len(w.yte)
    loss, acc = tl / n, tc / n
    er = {
        "epoch": epoch + 1, f"{eset}_loss": loss, f"{eset}_acc": acc,
        "mean_train_loss": sum(x["train_loss"] for x in flat) / len(flat),
        "mean_train_acc": sum(x["train_acc"] for x in flat) / len(flat),
        "global_img_per_s": sum(x["samples"] for x in flat) / max(slow, 1e-9), "epoch_wall_s": slow,
        "sync_s": info["sync_s"], "syncs": info["syncs"], "weight_divergence": info["divergence"],
        "grad_norm": sum(x["grad_norm"] for x in flat) / len(flat), "eval_s": t_eval,
        "lr": w._lr_now, "collapsed": is_collapsed(loss),
        "at_chance": is_at_chance(acc, loss), **diag,
    }
    _say(cfg, f"[Root] Epoch {epoch + 1}/{cfg.epochs} {eset}_acc={100 * acc:.2f}% {eset}_loss={loss:.4f} wall={slow:.2f}s"
              + (f" dead_conv10={100 * diag['dead_conv10_frac']:.0f}%" if diag else ""))
    return er, flat


def _end_epoch(comm: Comm, rec: RunRecord, er, flat, states, progress: dict) -> None:
    """Root: the epoch's records and the checkpoint. Run as a phase, so a failed write (a full disk)
    stops every process; and every process stops here on a signal that came during the epoch."""
    if comm.is_root:
        rec.add_epoch(er, flat)
        if states is not None:
            rec.save_checkpoint({r: s for p in states for r, s in p.items()}, progress)
    comm.check()


# ---------------------------------------------------------------------- the run

def run(cfg: RunConfig, comm: Comm | None = None, resume: str | os.PathLike | None = None, force: bool = False) -> dict:
    """Train with cfg on this process's logical ranks; return the run summary (on every process).
    ``resume``: a run folder to continue from its last checkpoint (cfg must be the recorded one);
    ``force``: even if its record says running (its processes ran on another host and are gone)."""
    cfg.validate()
    steps_per_call(), sharded_adam()  # a bad $LABTOOLS_STEPS_PER_CALL / _SHARDED_ADAM is said before any work
    comm = comm or Comm()
    comm.wait_limit = cfg.wait_limit or None
    # before any work (TensorFlow, data): a bad --out, a taken --run-id, a run that cannot be
    # continued or a damaged checkpoint is one sentence in a second, not after the data load
    early = _root_decides(comm, lambda: _check_start(cfg, resume, force), share=False)
    path, n_train = _prepare(cfg, comm)
    world = check_world(cfg, comm.size, n_train)
    cfg = cfg.replace(cifar_dir=path, np=world)  # np resolved: the science key is the same with or without --np
    # Threads change round-off: a resumed run keeps the thread count it started with, whatever P is now.
    threads = cfg.threads or (resume and _recorded(resume, "threads")) or default_threads(comm)
    _set_threads(threads)

    from .sync import make_strategy
    from .worker import Worker

    w = strategy = None
    try:
        w = Worker(cfg, comm, world, *_load(cfg, comm, path, world))
        strategy = make_strategy(cfg)
        return _run(cfg, comm, resume, world, threads, w, strategy, early)
    except BaseException as e:
        # A traceback kept by the caller (IPython keeps the last one) would keep every frame's
        # locals (the Worker, the data, the gathered states) alive: the finished frames are cleared
        # (their code and line numbers, all a printed traceback shows, stay).
        traceback.clear_frames(e.__traceback__)
        raise
    finally:
        # A notebook engine runs many trainings in one process: nothing this run built may outlive
        # it, on success or failure.
        _release(w, strategy)
        w = strategy = None
        comm.release()  # its watchdog, probe socket and progress file end with the run


def _load(cfg: RunConfig, comm: Comm, path: str, world: int):
    """(x_train, y_train, x_eval, y_eval) as this process needs them: the rows of its logical ranks'
    shards, the evaluation rows it evaluates and, on the root with diagnostics, the dead-ReLU probe
    rows (data.load_rows), indexed by global row number like the full arrays. Same numbers as the
    full load; LABTOOLS_FULL_LOAD=1 loads every image in every process (kept to show exactly that)."""
    if os.environ.get("LABTOOLS_FULL_LOAD") == "1":
        xtr, ytr, xte, yte = D.load_cifar10(path, limit_train=cfg.limit_train, limit_test=cfg.limit_test,
                                            test=not cfg.val_split)
        if cfg.val_split:  # selection runs never see the test set
            xtr, ytr, xte, yte = D.split_validation(xtr, ytr, cfg.val_split)
        return xtr, ytr, xte, yte
    probe = PROBE_ROWS if (cfg.diagnostics and comm.is_root) else 0
    return D.load_rows(path, world, comm.size, comm.rank, limit_train=cfg.limit_train, limit_test=cfg.limit_test,
                       val_split=cfg.val_split, probe=probe)


PROGRESS = ".progress"  # in the run folder: each process's state, read by a stuck wait's watchdog (labtools.comm)
PROBE_ROWS = 256  # labtools.worker's dead-ReLU probe batch: the first min(256, n_train) training images


def _release(w, strategy) -> None:
    """Drop what a run built (model, optimizer, traced step functions, data) and Keras's global state."""
    for obj in (w, strategy):
        if obj is not None:
            try:
                obj.__dict__.clear()
            except AttributeError:
                pass
    import gc

    try:  # a cleanup that fails must not hide the run's own outcome
        import keras

        keras.backend.clear_session()  # Keras's global state and TF's eager kernel cache; gc.collect()
    except Exception as e:  # noqa: BLE001
        import warnings

        warnings.warn(f"Keras state not cleared after the run ({type(e).__name__}: {e})", RuntimeWarning, stacklevel=2)
    gc.collect()


def _run(cfg: RunConfig, comm: Comm, resume, world: int, threads: int, w, strategy, early=None) -> dict:
    from .monitor import Monitor

    rec, progress = _open_record(cfg, comm, w, resume, threads, early)
    comm.on_stuck = lambda msg, culprits: rec.mark(FAILED, msg, not_arrived=culprits)
    for r in w.ranks:
        _say(cfg, f"[Rank {r}] world={world} batch/rank={w.b} shard={len(w.shards[r])} samples"
                  + (f" (resumed after epoch {progress['epochs_done']})" if progress["epochs_done"] else ""))
    if progress["init_diag"] is None:  # dead channels before any step: how close a seed starts to the collapse
        progress["init_diag"] = w.dead_relus() if (cfg.diagnostics and comm.is_root) else {}
    try:
        with Monitor() as mon:
            strategy.start(w)
            train_wall = 0.0
            for epoch in range(progress["epochs_done"], cfg.epochs):
                rows, info, t_train = _train_epoch(cfg, comm, w, strategy, epoch, mon)
                train_wall += t_train
                er, flat = _evaluate_epoch(cfg, comm, w, epoch, rows, info, t_train, mon)
                progress["epochs_done"] = epoch + 1
                if on_epoch is not None and comm.is_root:
                    on_epoch(epoch + 1, cfg.epochs, er)
                states = comm.gather_states(w.local_states()) if cfg.checkpoint else None
                comm.phase(_end_epoch, comm, rec, er, flat, states,
                           {**progress, "wall_s": progress["wall_s"] + comm.max(train_wall)})
        summary = _save(cfg, comm, w, rec, progress, progress["wall_s"] + comm.max(train_wall), mon)
    except (RunInterrupted, KeyboardInterrupt) as e:
        kept = (f"the checkpoint after epoch {progress['epochs_done']} is kept" if cfg.checkpoint and progress["epochs_done"]
                else "no checkpoint: it starts again from epoch 1")
        _stopped(comm, rec, INTERRUPTED, f"{e or 'KeyboardInterrupt'}; {kept}: continue with "
                                         f"`labtools train --resume {rec.dir}`")
        raise
    except BaseException as e:
        _stopped(comm, rec, FAILED, f"{type(e).__name__}: {e}")
        raise
    summary = comm.bcast(summary)
    summary["run_dir"] = str(rec.dir)
    return summary


def _stopped(comm: Comm, rec: RunRecord, status: str, error: str) -> None:
    if comm.is_root:
        rec.mark(status, error)


def _save(cfg, comm, w, rec: RunRecord, progress: dict, global_wall: float, mon) -> dict | None:
    """Final digests, wall-time kind and summary; `completed` last (RunRecord.complete)."""
    spans = comm.gather((comm.host, *mon.span()))
    w.flush()
    # Every logical rank's final weights, fingerprinted: after the last sync they must all agree.
    digests = comm.gather({r: hashlib.sha1(w.states[r][0].tobytes()).hexdigest()[:16] for r in w.ranks})
    return comm.phase(_complete, cfg, comm, w, rec, progress, global_wall, spans, digests)


def _complete(cfg, comm, w, rec: RunRecord, progress, global_wall, spans, digests) -> dict | None:
    if not comm.is_root:
        return None
    if cfg.save_weights:
        np.save(rec.dir / "final_weights.npy", w.states[w.ranks[0]][0])
    summary = rec.summarize(cfg, comm.size, global_wall, records.other_load(spans),
                            {str(r): h for part in digests for r, h in part.items()}, progress["init_diag"])
    eset, name = cfg.eval_set, "Test" if cfg.eval_set == "test" else "Validation"
    _say(cfg, f"[Root] Global wall time: {global_wall:.2f}s")
    _say(cfg, f"[Root] Mean train acc: {100 * summary['mean_train_acc']:.2f}% | loss: {summary['mean_train_loss']:.4f}")
    _say(cfg, f"[Root] {name} acc: {100 * summary[f'{eset}_acc']:.2f}% | {name} loss: {summary[f'{eset}_loss']:.4f}")
    rec.complete(summary)
    _say(cfg, f"[Root] Run folder: {rec.dir}")
    return summary


__all__ = ["run", "check_world", "RankFailure", "RunInterrupted"]
