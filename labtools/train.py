"""labtools.train.run(config): the per-process training loop, the same under mpiexec, ipyparallel or plain Python.

Order of work: validate the config and the world (one clear sentence, before any training), find
and verify CIFAR-10, build this process's logical ranks, then per epoch: the sync strategy trains,
the processes evaluate the synchronized model on the test set together, the root writes records.
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np

from .comm import Comm, RankFailure, default_threads
from .config import ConfigError, RunConfig
from . import data as D
from . import numerics, provenance, records, results
from .metrics import is_at_chance, is_collapsed


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
    import tensorflow as tf

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


def _prepare(cfg: RunConfig, comm: Comm):
    """Root finds, downloads if needed, and verifies the data; everyone then checks the same path."""
    err, path = None, None
    if comm.is_root:
        try:
            path = str(D.verify(D.find_cifar_dir(cfg.cifar_dir)))
        except (D.DataError, OSError) as e:
            err = str(e)
    err, path = comm.bcast((err, path))
    if err:
        raise D.DataError(err)
    local_err = None if all((Path(path) / f).is_file() for f in D.MD5) else \
        f"CIFAR-10 folder {path} (verified on the root) is missing on host {comm.host}; every node needs it at the same path."
    bad = [m for m in comm.allgather(local_err) if m]
    if bad:
        raise D.DataError(bad[0])
    n_train = min(cfg.limit_train or D.TRAIN_SIZE, D.TRAIN_SIZE)
    return path, n_train


def _say(cfg: RunConfig, line: str) -> None:
    if not cfg.quiet:
        print(line, flush=True)


def run(cfg: RunConfig, comm: Comm | None = None) -> dict:
    """Train with cfg on this process's logical ranks; return the run summary (on every process)."""
    cfg.validate()
    comm = comm or Comm()
    path, n_train = _prepare(cfg, comm)
    world = check_world(cfg, comm.size, n_train)
    cfg = cfg.replace(cifar_dir=path, np=world)  # np resolved: the science key is the same with or without --np
    eset = cfg.eval_set  # "test", or "val" when a validation split is held out
    _set_threads(cfg.threads or default_threads(comm))

    from .monitor import Monitor
    from .sync import make_strategy
    from .worker import Worker

    xtr, ytr, xte, yte = D.load_cifar10(path, limit_train=cfg.limit_train, limit_test=cfg.limit_test,
                                        test=not cfg.val_split)
    if cfg.val_split:  # selection runs never see the test set
        xtr, ytr, xte, yte = D.split_validation(xtr, ytr, cfg.val_split)
    w = Worker(cfg, comm, world, xtr, ytr, xte, yte)
    strategy = make_strategy(cfg)

    # ---- run directory and manifest (root), path shared with everyone
    run_dir = None
    if comm.is_root:
        run_id = cfg.run_id or f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-np{world}-{cfg.science_key()}-s{cfg.seed}"
        run_dir = Path(cfg.out) / cfg.experiment / run_id
        if (run_dir / "manifest.json").exists():
            run_dir = run_dir.with_name(f"{run_id}-{os.getpid()}")
    run_dir = Path(comm.bcast(str(run_dir) if run_dir else None))
    hosts = comm.gather(comm.host)
    cores = comm.gather((comm.host, os.cpu_count()))
    manifest = {
        "config": {**cfg.to_dict(), "cifar_dir": provenance.portable_path(cfg.cifar_dir),
                   "out": provenance.portable_path(cfg.out)}, "world": world, "processes": comm.size, "ranks_per_process": w.k,
        "hosts": hosts,
        "cores_per_host": dict(cores) if cores else None, "science_key": cfg.science_key(),
        "mpi_library": comm.library_version(), "git_commit": provenance.git_commit(),
        "versions": provenance.versions(), "host": provenance.host(), "start_utc": provenance.utc_now(),
        "n_train": len(ytr), "n_test": len(yte) if eset == "test" else 0, "steps_per_epoch": w.steps_per_epoch,
        "seed": cfg.seed, "status": "running", "eval_set": eset, "n_eval": len(yte),
        "numerics_version": numerics.VERSION, "numerics_sources": numerics.sources_sha(),
    }
    if comm.is_root:
        results.write_json(run_dir / "manifest.json", manifest)
    for r in w.ranks:
        _say(cfg, f"[Rank {r}] world={world} batch/rank={w.b} shard={len(w.shards[r])} samples")

    # Dead channels at initialisation (before any step): how close a seed starts to the collapse.
    init_diag = w.dead_relus() if (cfg.diagnostics and comm.is_root) else {}
    rank_rows = {}  # root only: every logical rank's epoch rows, as gathered
    epoch_rows = []
    train_wall = 0.0
    try:
        with Monitor() as mon:
            strategy.start(w)
            for epoch in range(cfg.epochs):
                t0 = time.perf_counter()
                stats, info = strategy.train_epoch(w, epoch)
                t_train = time.perf_counter() - t0
                train_wall += t_train
                rss, cpu = mon.lap()
                rows = {}
                for r in w.ranks:
                    st = stats[r]
                    rows[r] = {
                        "rank": r, "epoch": epoch + 1, "train_loss": st.loss / max(st.n, 1),
                        "train_acc": st.correct / max(st.n, 1), "samples": st.n, "epoch_s": st.seconds,
                        "mean_step_s": st.seconds / max(st.steps, 1), "img_per_s": st.n / max(st.seconds, 1e-9),
                        "grad_norm": st.gnorm / max(st.steps, 1), "peak_rss_mb": rss, "cpu_pct": cpu,
                        "process": comm.rank, "process_epoch_s": t_train,
                    }
                    _say(cfg, f"[Rank {r}] Epoch {epoch + 1}/{cfg.epochs} loss={rows[r]['train_loss']:.4f} "
                              f"acc={rows[r]['train_acc']:.4f} time={st.seconds:.2f}s")
                # ---- evaluate the synchronized model together; gather rank rows to the root
                t1 = time.perf_counter()
                ev = _evaluate_phase(w)
                tl, tc = comm.sum(ev[0]), comm.sum(ev[1])
                diag = w.dead_relus() if (cfg.diagnostics and comm.is_root) else {}
                t_eval = time.perf_counter() - t1
                all_rows = comm.gather(rows)
                slow = comm.max(t_train)
                if comm.is_root:
                    flat = [row for part in all_rows for row in part.values()]
                    n_all = sum(x["samples"] for x in flat)
                    ev_loss, ev_acc = tl / len(yte), tc / len(yte)
                    er = {
                        "epoch": epoch + 1, f"{eset}_loss": ev_loss, f"{eset}_acc": ev_acc,
                        "mean_train_loss": sum(x["train_loss"] for x in flat) / len(flat),
                        "mean_train_acc": sum(x["train_acc"] for x in flat) / len(flat),
                        "global_img_per_s": n_all / max(slow, 1e-9), "epoch_wall_s": slow,
                        "sync_s": info["sync_s"], "syncs": info["syncs"], "weight_divergence": info["divergence"],
                        "grad_norm": sum(x["grad_norm"] for x in flat) / len(flat), "eval_s": t_eval,
                        "lr": w._lr_now, "collapsed": is_collapsed(ev_loss),
                        "at_chance": is_at_chance(ev_acc, diag.get("dead_conv10_frac"), ev_loss), **diag,
                    }
                    epoch_rows.append(er)
                    results.write_csv(run_dir / "epochs.csv", epoch_rows)
                    for row in flat:
                        rank_rows.setdefault(row["rank"], []).append(row)
                    for r, rr in rank_rows.items():
                        results.write_csv(run_dir / "ranks" / f"rank_{r:03d}.csv", rr)
                    _say(cfg, f"[Root] Epoch {epoch + 1}/{cfg.epochs} {eset}_acc={ev_acc:.4f} "
                              f"{eset}_loss={ev_loss:.4f} wall={slow:.2f}s"
                              + (f" dead_conv10={diag['dead_conv10_frac']:.2f}" if diag else ""))
    except BaseException as e:
        if comm.is_root:
            results.atomic_write_text(run_dir / "error.txt", f"{type(e).__name__}: {e}\n")
            results.write_json(run_dir / "manifest.json", {**manifest, "status": "failed",
                                                           "end_utc": provenance.utc_now(), "error": str(e)})
        raise

    global_wall = comm.max(train_wall)
    # Decided here, once (topology and the other load measured on each host); tables and figures only read it.
    spans = comm.gather((comm.host, *mon.span()))
    if comm.is_root:
        other = records.other_load(spans)
        time_kind = records.wall_time_kind(world, comm.size, hosts, dict(cores), other)
        manifest.update(other_cores=other, wall_time_kind=time_kind, cluster_wall_time=time_kind == records.CLUSTER)
    # Every logical rank's final weights, fingerprinted: after the last sync they must all agree.
    w.flush()
    digests = comm.gather({r: hashlib.sha1(w.states[r][0].tobytes()).hexdigest()[:16] for r in w.ranks})
    if comm.is_root and cfg.save_weights:
        np.save(run_dir / "final_weights.npy", w.states[w.ranks[0]][0])
    summary = None
    if comm.is_root:
        last = epoch_rows[-1]
        summary = {
            "world": world, "processes": comm.size, "epochs": cfg.epochs, "sync": cfg.sync, "seed": cfg.seed,
            "batch_per_node": cfg.batch_per_node, "batch_per_rank": cfg.batch_per_rank,
            f"{eset}_acc": last[f"{eset}_acc"], f"{eset}_loss": last[f"{eset}_loss"], "eval_set": eset,
            "mean_train_loss": last["mean_train_loss"], "mean_train_acc": last["mean_train_acc"],
            "global_wall_s": global_wall, "cluster_wall_time": manifest["cluster_wall_time"],
            "wall_time_kind": manifest["wall_time_kind"],
            "collapsed": bool(last["collapsed"]), "at_chance": bool(last["at_chance"]), "dead_conv10_frac": last.get("dead_conv10_frac"),
            **{f"init_{k}": v for k, v in init_diag.items()},
            "mean_epoch_s": sum(r["epoch_wall_s"] for r in epoch_rows) / len(epoch_rows),
            "eval_s": sum(r["eval_s"] for r in epoch_rows),
            "final_weight_digests": {str(r): h for part in digests for r, h in part.items()},
        }
        _say(cfg, f"[Root] Global wall time: {global_wall:.2f}s")
        _say(cfg, f"[Root] Mean train acc: {100 * summary['mean_train_acc']:.2f}% | loss: {summary['mean_train_loss']:.4f}")
        _say(cfg, f"[Root] {'Test' if eset == 'test' else 'Validation'} acc: {summary[f'{eset}_acc']:.4f} | "
                  f"{'Test' if eset == 'test' else 'Validation'} loss: {summary[f'{eset}_loss']:.4f}")
        results.write_json(run_dir / "manifest.json", {**manifest, "status": "completed", "end_utc": provenance.utc_now()})
        results.append_csv_row(Path(cfg.out) / cfg.experiment / "scaling_results.csv", {
            "world": world, "epochs": cfg.epochs, "batch_per_node": cfg.batch_per_node,
            "batch_per_rank": cfg.batch_per_rank, "mean_train_loss": f"{summary['mean_train_loss']:.4f}",
            "mean_train_acc_pct": f"{100 * summary['mean_train_acc']:.2f}", "global_time_sec": f"{global_wall:.2f}",
            "cifar_dir": provenance.portable_path(path), "test_acc_pct": f"{100 * summary['test_acc']:.2f}" if eset == "test" else "",
            "test_loss": f"{summary['test_loss']:.4f}" if eset == "test" else "", "processes": comm.size, "sync": cfg.sync,
            "seed": cfg.seed, "run_id": run_dir.name}, results.SCALING_COLUMNS)
        results.write_json(run_dir / "summary.json", summary)  # last: marks the run complete
    summary = comm.bcast(summary)
    summary["run_dir"] = str(run_dir)
    return summary


def _evaluate_phase(w):
    from .sync import run_phase

    return run_phase(w, w.evaluate)


__all__ = ["run", "check_world", "RankFailure"]
