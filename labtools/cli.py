"""`labtools train | runs | data | reproduce | report` command line.

    mpiexec -n 2 labtools train --epochs 10              # the paper's np=2 protocol
    mpiexec -n 2 labtools train --np 16 --epochs 10      # np=16 on 2 processes (logical ranks)
    mpiexec -n 2 labtools train --resume results/default/RUN_ID   # continue a stopped run
    labtools runs                                        # every run and its status
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback


def _train(ns) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from . import keeper

    if os.environ.get(keeper.ENV_WORKER) != "1" and not ns.no_keeper:
        return keeper.keep(ns.argv)  # the work runs in a child this process watches
    from . import comm as C

    C.catch_signals()  # before TensorFlow loads: a Ctrl-C now stops at the next step, in one line
    from .config import ConfigError
    from .data import DataError

    try:
        cfg, resume = _train_config(ns), ns.resume
    except ConfigError as e:
        return _say_once(f"labtools: error: {e}", 2)
    comm = C.Comm()
    from .train import run

    try:
        run(cfg, comm, resume=resume)
        return 0
    except (ConfigError, DataError) as e:
        # Raised identically on every process before any training: say it once.
        return _say_once(f"labtools: error: {e}", 2, comm)
    except C.RunInterrupted as e:
        sig = C.stop_signal or "SIGTERM"
        return _say_once(f"labtools: {e}", 128 + getattr(__import__("signal"), sig), comm)
    except C.RankFailure as e:
        return _say_once(f"labtools: training failed: {e}", 1, comm)
    except BaseException as e:  # noqa: BLE001 - unexpected: say it, then make sure no rank hangs
        print(f"[Process {comm.rank}] labtools: unexpected error: {type(e).__name__}: {e}", file=sys.stderr)
        if not isinstance(e, KeyboardInterrupt):
            traceback.print_exc()
        if comm.size > 1:
            comm.abort(1)
        return 1


def _say_once(line: str, rc: int, comm=None) -> int:
    from .keeper import process_rank

    if (comm.rank if comm is not None else (process_rank() or 0)) == 0:
        print(line, file=sys.stderr, flush=True)
    return rc


# Flags that --resume may change: where the data is, how loud, how many threads, how long to wait.
RESUME_MAY_SET = {"cifar_dir", "quiet", "threads", "wait_limit", "eval_batch"}


def _train_config(ns):
    """The RunConfig of this launch: the flags, or with --resume the recorded one."""
    from dataclasses import fields

    from .config import ConfigError, RunConfig

    if not ns.resume:
        return RunConfig.from_args(ns)
    import json
    from pathlib import Path

    man = Path(ns.resume) / "manifest.json"
    if not man.is_file():
        raise ConfigError(f"--resume {ns.resume}: no manifest.json there; give the run's folder (OUT/EXPERIMENT/RUN_ID).")
    try:
        recorded = json.loads(man.read_text())["config"]
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"--resume {ns.resume}: cannot read {man} ({type(e).__name__}); "
                          f"give the run's folder (OUT/EXPERIMENT/RUN_ID).") from None
    given = [f.name for f in fields(RunConfig) if getattr(ns, f.name) != f.default]
    extra = sorted(set(given) - RESUME_MAY_SET)
    if extra:
        raise ConfigError(f"--resume takes its configuration from {man}; drop "
                          f"{', '.join('--' + e.replace('_', '-') for e in extra)}.")
    known = {f.name for f in fields(RunConfig)}
    cfg = RunConfig(**{k: v for k, v in recorded.items() if k in known})
    # where records go: the folder being resumed (its recorded "out" may be relative to another cwd)
    cfg = cfg.replace(out=str(Path(ns.resume).parent.parent), experiment=Path(ns.resume).parent.name,
                      run_id=Path(ns.resume).name)
    over = {k: getattr(ns, k) for k in given}
    if cfg.cifar_dir and cfg.cifar_dir.startswith("$") and "cifar_dir" not in over:
        over["cifar_dir"] = None  # "$CIFAR10_DIR" as recorded: found again through the environment
    return cfg.replace(**over)


def _runs(ns) -> int:
    from pathlib import Path

    from .record import format_listing, listing, rebuild_scaling_csv

    if not os.path.isdir(ns.results):
        print(f"labtools: error: no results folder {ns.results}", file=sys.stderr)
        return 2
    if ns.rebuild:
        for exp in sorted(Path(ns.results).glob(ns.experiment or "*")):
            if exp.is_dir() and any(exp.glob("*/manifest.json")):
                print(rebuild_scaling_csv(exp))
        return 0
    print(format_listing(listing(ns.results, ns.experiment)), end="")
    return 0


def _data(ns) -> int:
    from . import data as D

    if ns.deadline is not None and not ns.deadline > 0:
        print(f"labtools: error: --deadline must be a positive number of seconds; got {ns.deadline}.", file=sys.stderr)
        return 2
    try:
        if ns.action == "where":
            print(D.find_cifar_dir(ns.cifar_dir, download=False))
        elif ns.action == "verify":
            print(f"ok: {D.verify(D.find_cifar_dir(ns.cifar_dir, download=False), force=True)}")
        elif ns.action == "download":
            print(D.download_cifar10(ns.dest, deadline=ns.deadline))
    except D.DataError as e:
        print(f"labtools: error: {e}", file=sys.stderr)
        return 2
    return 0


def _reproduce(ns) -> int:
    from .reproduce import ReproduceError, reproduce

    try:
        reproduce(profile=ns.profile, notebooks=ns.notebook or None, out=ns.out, results_root=ns.results,
                  run_missing=not ns.stored_only)
    except ReproduceError as e:
        print(f"labtools: reproduce failed: {e}", file=sys.stderr)
        return 1
    return 0


def _report(ns) -> int:
    from .report import write_report

    try:
        for path in write_report(os.path.join(ns.out, ns.profile)):
            print(path)
        if ns.readme:
            from .readme import update_readme

            changed = update_readme(ns.readme, os.path.join(ns.out, ns.profile))
            print(f"{ns.readme}: results block {'rewritten' if changed else 'already up to date'}")
    except (FileNotFoundError, ValueError) as e:
        print(f"labtools: error: {e}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .config import RunConfig

    p = _Parser(prog="labtools", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    t = sub.add_parser("train", help="train (run under mpiexec -n P)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    RunConfig.add_arguments(t)
    t.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue this interrupted or failed run from its last checkpoint, in the same folder "
                        "(same world N; any P that divides it)")
    t.add_argument("--no-keeper", action="store_true",
                   help="run the work in this process (no watching parent that records a kill -9)")
    t.set_defaults(fn=_train)
    u = sub.add_parser("runs", help="list runs with their status (completed, failed, interrupted, running, died)")
    u.add_argument("--results", default="results", help="results store root")
    u.add_argument("--experiment", default=None, help="only this experiment")
    u.add_argument("--rebuild", action="store_true", help="rebuild each experiment's scaling_results.csv from its records")
    u.set_defaults(fn=_runs)
    d = sub.add_parser("data", help="find, verify or download CIFAR-10",
                       description="where: print the CIFAR-10 folder labtools would use (--cifar-dir, $CIFAR10_DIR, "
                                   "data/, ~/.keras/datasets). verify: check the md5 of its seven files. download: "
                                   "fetch the official archive into --dest, check its sha256 and the files' md5.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d.add_argument("action", choices=("where", "verify", "download"), help="what to do")
    d.add_argument("--cifar-dir", default=None, help="folder holding the cifar-10-batches-py files")
    d.add_argument("--dest", default="data", help="download target folder")
    d.add_argument("--deadline", type=float, default=None,
                   help="seconds the whole download may take (default: $LABTOOLS_DOWNLOAD_DEADLINE or 900)")
    d.set_defaults(fn=_data)
    from .studies import NOTEBOOKS, PROFILES

    r = sub.add_parser("reproduce", help="re-execute the notebooks with papermill, regenerate figures/ and the report")
    r.add_argument("--profile", default="quick", choices=PROFILES, help="how much of the paper's protocol to run")
    r.add_argument("--notebook", action="append", choices=NOTEBOOKS, help="only this notebook (repeatable)")
    r.add_argument("--out", default="figures", help="where tables, figures and executed notebooks go")
    r.add_argument("--results", default="results", help="results store root")
    r.add_argument("--stored-only", action="store_true",
                   help="run nothing: tables and figures from the runs already stored, marked partial if some are missing")
    r.set_defaults(fn=_reproduce)
    rp = sub.add_parser("report", help="write FIGURES/PROFILE/REPORT.md and .html from the regenerated tables")
    rp.add_argument("--profile", default="paper", choices=PROFILES)
    rp.add_argument("--out", default="figures", help="where the profile's tables and figures are")
    rp.add_argument("--readme", default=None, metavar="README.md",
                    help="also rewrite this README's generated results block from the tables")
    rp.set_defaults(fn=_report)
    return p


class _Parser(argparse.ArgumentParser):
    """A usage error is one line, printed by MPI rank 0 only: `mpiexec -n 2 labtools train --sync x`
    says it once, and does not bury it under the full usage (`--help` shows that)."""

    def error(self, message):
        from .keeper import process_rank

        if (process_rank() or 0) == 0:
            print(f"{self.prog}: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = build_parser().parse_args(argv)
    ns.argv = argv
    return ns.fn(ns)


if __name__ == "__main__":
    sys.exit(main())
