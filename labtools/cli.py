"""`labtools train | data | reproduce` command line.

    mpiexec -n 2 labtools train --epochs 10              # the paper's np=2 protocol
    mpiexec -n 2 labtools train --np 16 --epochs 10      # np=16 on 2 processes (logical ranks)
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback


def _train(ns) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from .comm import Comm, RankFailure
    from .config import ConfigError, RunConfig
    from .data import DataError
    from .train import run

    cfg = RunConfig.from_args(ns)
    comm = Comm()
    try:
        run(cfg, comm)
        return 0
    except (ConfigError, DataError) as e:
        # Raised identically on every process before any training: say it once.
        if comm.is_root:
            print(f"labtools: error: {e}", file=sys.stderr, flush=True)
        return 2
    except RankFailure as e:
        if comm.is_root:
            print(f"labtools: training failed: {e}", file=sys.stderr, flush=True)
        return 1
    except BaseException as e:  # noqa: BLE001 - unexpected: say it, then make sure no rank hangs
        print(f"[Process {comm.rank}] labtools: unexpected error: {type(e).__name__}: {e}", file=sys.stderr)
        traceback.print_exc()
        if comm.size > 1:
            comm.abort(1)
        return 1


def _data(ns) -> int:
    from . import data as D

    try:
        if ns.action == "where":
            print(D.find_cifar_dir(ns.cifar_dir, download=False))
        elif ns.action == "verify":
            print(f"ok: {D.verify(D.find_cifar_dir(ns.cifar_dir, download=False), force=True)}")
        elif ns.action == "download":
            print(D.download_cifar10(ns.dest))
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

    p = argparse.ArgumentParser(prog="labtools", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train (run under mpiexec -n P)")
    RunConfig.add_arguments(t)
    t.set_defaults(fn=_train)
    d = sub.add_parser("data", help="find, verify or download CIFAR-10")
    d.add_argument("action", choices=("where", "verify", "download"))
    d.add_argument("--cifar-dir", default=None)
    d.add_argument("--dest", default="data", help="download target folder")
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


def main(argv=None) -> int:
    ns = build_parser().parse_args(argv)
    return ns.fn(ns)


if __name__ == "__main__":
    sys.exit(main())
