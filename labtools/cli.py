"""`labtools train | runs | data | reproduce | report` command line.

    mpiexec -n 2 labtools train --epochs 10              # the paper's np=2 protocol
    mpiexec -n 2 labtools train --np 16 --epochs 10      # np=16 on 2 processes (logical ranks)
    mpiexec -n 2 labtools train --resume RUN_DIR         # continue a stopped run (OUT/EXPERIMENT/RUN_ID)
    labtools runs                                        # what have I run? newest first
    labtools data where                                  # the CIFAR-10 folder training would use
    labtools reproduce --profile quick                   # the notebooks, figures/ and the report
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import traceback


ENV_VERBOSE = "LABTOOLS_VERBOSE"  # "1": TensorFlow's start-up lines shown (inherited by the keeper's child)
# TensorFlow's start-up lines: absl's notice, its INFO and WARNING lines (oneDNN, the CPU feature guard),
# the feature guard's second line. ERROR and FATAL lines are never dropped.
TF_NOISE = re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$"
                      r"|^[IW]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [\w.-]+:\d+\] "
                      r"|^To enable the following instructions: .*rebuild TensorFlow with the appropriate compiler")
QUIET_LOGGERS = ("tensorflow", "absl", "keras")
QUIET_WARNINGS_FROM = r"(tensorflow|keras|absl|tf_keras|google\.protobuf)(\.|$)"


def quiet_tensorflow(verbose: bool = False) -> None:
    """TensorFlow's start-up noise off (verbose: on), for this process and the ones it starts.

    TF_CPP_MIN_LOG_LEVEL=2 and LABTOOLS_VERBOSE go to the environment (the keeper's training child,
    notebook kernels and engines inherit it); TensorFlow's Python side is quieted here: the
    `tensorflow`, `absl` and `keras` loggers at ERROR, warnings raised in their modules ignored.
    The C++ lines TensorFlow 2.2x prints while it is imported ignore TF_CPP_MIN_LOG_LEVEL (absl
    prints them before its logging is initialised): import_tensorflow drops them.
    """
    if verbose:
        os.environ[ENV_VERBOSE] = "1"
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
        return
    import logging
    import warnings

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=QUIET_WARNINGS_FROM)


def import_tensorflow():
    """`import tensorflow`, without its start-up lines unless $LABTOOLS_VERBOSE is 1.

    What the import writes to file descriptor 2 (C++ writes there directly) goes to a temporary file;
    afterwards every line but TF_NOISE is written to stderr, so an error still shows."""
    if "tensorflow" in sys.modules or os.environ.get(ENV_VERBOSE) == "1":
        import tensorflow as tf

        return tf
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as tmp:
            os.dup2(tmp.fileno(), 2)
            try:
                import tensorflow as tf
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                tmp.seek(0)
                kept = [l for l in tmp.read().decode(errors="replace").splitlines(keepends=True)
                        if not TF_NOISE.search(l)]
                if kept:
                    sys.stderr.write("".join(kept))
                    sys.stderr.flush()
    finally:
        os.close(saved)
    return tf


def _train(ns) -> int:
    quiet_tensorflow(ns.verbose)
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
        run(cfg, comm, resume=resume, force=ns.force)
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

    if getattr(ns, "force", False) and not ns.resume:
        raise ConfigError("--force goes with --resume RUN_DIR (a run whose record says running on another host).")
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

    from .listing import ListingError, default_out, no_runs, render, render_run

    if ns.rebuild:
        from .record import rebuild_scaling_csv

        if not os.path.isdir(ns.results):
            print(f"labtools: error: no results folder {ns.results}", file=sys.stderr)
            return 2
        for exp in sorted(Path(ns.results).glob(ns.experiment or "*")):
            if exp.is_dir() and any(exp.glob("*/manifest.json")):
                print(rebuild_scaling_csv(exp))
        return 0
    try:
        if ns.run:
            print(render_run(ns.results, ns.run, ns.experiment), end="")
        else:
            print(render(ns.results, ns.experiment, show_all=ns.all, long=ns.long), end="")
    except ListingError as e:
        if ns.results == default_out() and not os.path.exists(ns.results) and not ns.run:
            print(no_runs(ns.results))  # a fresh checkout: nothing run yet is not an error
            return 0
        print(f"labtools: error: {e}", file=sys.stderr)
        return 2
    return 0


def _data(ns) -> int:
    from . import data as D, paths

    if ns.deadline is not None and not ns.deadline > 0:
        print(f"labtools: error: --deadline must be a positive number of seconds; got {ns.deadline}.", file=sys.stderr)
        return 2
    try:
        if ns.action == "where":
            print(D.find_cifar_dir(ns.cifar_dir, download=False))
        elif ns.action == "verify":
            print(f"ok: {D.verify(D.find_cifar_dir(ns.cifar_dir, download=False), force=True)}")
        elif ns.action == "download":
            print(D.download_cifar10(ns.dest or paths.data_home(), deadline=ns.deadline))
    except D.DataError as e:
        print(f"labtools: error: {e}", file=sys.stderr)
        return 2
    return 0


def _kernels_cmd(ns) -> int:
    quiet_tensorflow(ns.verbose)
    if ns.cache:
        os.environ["LABTOOLS_KERNEL_CACHE"] = os.path.abspath(ns.cache)
    import_tensorflow()
    from . import kernels

    return kernels.build_all() if ns.action == "build" else kernels.check_all()


def _reproduce(ns) -> int:
    quiet_tensorflow(ns.verbose)  # the notebook kernels and their engines inherit the environment
    from .reproduce import ReproduceError, reproduce

    try:
        reproduce(profile=ns.profile, notebooks=ns.notebook or None, out=ns.out, results_root=ns.results,
                  run_missing=not ns.stored_only, verbose=ns.verbose, cifar_dir=ns.cifar_dir, retime=ns.retime,
                  write_store=ns.write_store)
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


# What an option whose default is None does when it is not given (shown as its "(default: ...)").
NONE_MEANS = {
    "cifar_dir": "the first that holds the seven files of $CIFAR10_DIR, <project root>/data/cifar-10-batches-py "
                 "(the labtools checkout, not the current folder; a wheel install: the per-user data folder), "
                 "~/.keras/datasets/cifar-10-batches-py",
    "limit_train": "all 50000", "limit_test": "all 10000", "inject_failure": "none", "resume": "a new run",
    "experiment": "every experiment", "notebook": "every notebook, in order", "readme": "none",
}


class _Help(argparse.RawDescriptionHelpFormatter):
    """Descriptions wrapped paragraph by paragraph, indented lines (examples) kept as written; every
    option that takes a value says its default: help that names it keeps its own words, a None
    default says what happens (NONE_MEANS), an --x/--no-x pair says which of the two is the default."""

    def _fill_text(self, text, width, indent):
        import textwrap

        return "\n".join(line if not line.strip() or line[0].isspace() else
                         textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent)
                         for line in text.splitlines())

    def _get_help_string(self, action):
        h = action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS or "%(default)" in h or "default:" in h:
            return h  # positionals (choices listed), help that says it already
        if isinstance(action, argparse.BooleanOptionalAction):
            on, off = action.option_strings[:2]
            return f"{h} (default: {on if action.default else off})"
        if action.nargs == 0:
            return h  # a flag: off unless given
        if action.default is None or action.default == "":
            said = NONE_MEANS.get(action.dest, "none")
            return f"{h} (default: {said.replace('%', '%%')})"
        return f"{h} (default: %(default)s)"


PROFILE_HELP = ("how much of the paper's protocol: smoke (CI: a CIFAR-10 subset, minutes), quick (reduced and "
                "labelled so), paper (the paper's protocol, three repeats)")


def build_parser() -> argparse.ArgumentParser:
    from .config import RunConfig
    from .studies import NOTEBOOKS, PROFILES

    from .listing import default_out

    out = default_out()
    from . import __version__

    p = _Parser(prog="labtools", description=__doc__, formatter_class=_Help)
    p.add_argument("--version", action="version", version=f"labtools {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser, metavar="COMMAND", title="commands")
    p.commands = sub.choices
    t = sub.add_parser("train", help="train SqueezeNet on CIFAR-10 (run under mpiexec -n P)", formatter_class=_Help,
                       usage="mpiexec -n P %(prog)s [options]",
                       description="Train on every MPI process; the run is recorded in OUT/EXPERIMENT/RUN_ID/ "
                                   "(manifest, epochs.csv, per-rank CSVs, checkpoint, summary).\n\n"
                                   "  mpiexec -n 2 labtools train --epochs 10            # the paper's np=2 protocol\n"
                                   "  mpiexec -n 2 labtools train --np 16 --epochs 10    # 16 logical ranks on 2 "
                                   "processes\n"
                                   "  mpiexec -n 2 labtools train --resume RUN_DIR       # continue a stopped run")
    run_control = RunConfig.add_arguments(t)["run control"]
    run_control.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue this interrupted or failed run from its last checkpoint, in the same folder "
                        "(same world N; any P that divides it)")
    run_control.add_argument("--force", action="store_true",
                             help="with --resume: continue a run whose record still says running although its "
                                  "processes, on another host, are gone (check that first)")
    run_control.add_argument("--no-keeper", action="store_true",
                             help="run the work in this process (no watching parent that records a kill -9)")
    run_control.add_argument("--verbose", action="store_true",
                             help="show TensorFlow's start-up log lines and warnings (silenced otherwise)")
    t.set_defaults(fn=_train)
    u = sub.add_parser("runs", help="what have I run? every run with its status, newest first", formatter_class=_Help,
                       description="One line per run folder of the results store, newest first, under its "
                                   "experiment: run id, np (logical ranks N), P (processes), strategy (a short name; "
                                   "[x] marks a config that differs from that strategy's, explained under the "
                                   "table), seed, epochs (done/planned unless completed), result (test accuracy, "
                                   "'val' for validation accuracy; else how the run ended: failed, interrupted, "
                                   "running, or died: running but its heartbeat stopped), training wall time and "
                                   "how long ago it started.\n\n"
                                   "  labtools runs --long             # each run in words: status, strategy, paths\n"
                                   "  labtools runs RUN_ID             # one run, with its whole config")
    u.add_argument("run", nargs="?", default=None, metavar="RUN_ID",
                   help="show this run in full: a run id (or its unique start), EXPERIMENT/RUN_ID, or a run folder")
    u.add_argument("--results", default=out, metavar="DIR", help="results store root (where `labtools train` writes)")
    u.add_argument("--experiment", default=None, metavar="NAME", help="only this experiment")
    u.add_argument("--all", action="store_true", help="every run (otherwise the 20 newest)")
    u.add_argument("--long", action="store_true", help="each run in words (status, full strategy, how its config "
                                                       "differs, hosts, times, folder) instead of the table")
    u.add_argument("--rebuild", action="store_true", help="rebuild each experiment's scaling_results.csv from its records")
    u.set_defaults(fn=_runs)
    d = sub.add_parser("data", help="find, verify or download CIFAR-10", formatter_class=_Help,
                       description="where: print the CIFAR-10 folder labtools would use (--cifar-dir, $CIFAR10_DIR, "
                                   "then <project>/data/cifar-10-batches-py where <project> is the checkout labtools runs from (a wheel "
                                   "install: the per-user data folder, e.g. ~/.local/share/labtools), then "
                                   "~/.keras/datasets/cifar-10-batches-py; never the current folder; the first that "
                                   "holds all seven files). verify: check the md5 of its seven files. download: "
                                   "fetch the official archive into --dest, check its sha256 and the files' md5.")
    d.add_argument("action", choices=("where", "verify", "download"), help="what to do: where, verify or download")
    d.add_argument("--cifar-dir", default=None, help="folder holding the cifar-10-batches-py files")
    d.add_argument("--dest", default=None, help="download target folder (default: <project>/data, or the per-user "
                                                "data folder of a wheel install)")
    d.add_argument("--deadline", type=float, default=None,
                   help="seconds the whole download may take (default: $LABTOOLS_DOWNLOAD_DEADLINE or 900)")
    d.set_defaults(fn=_data)
    k = sub.add_parser("kernels", help="build the compiled kernels into the cache, or check what loads here",
                       formatter_class=_Help,
                       description="The fused Adam kernel and the in-graph MPI op are compiled on first use into a "
                                   "cache ($LABTOOLS_KERNEL_CACHE, else ~/.cache/labtools/ops), failures included. "
                                   "build: compile both now (again, if a build failed before), for this machine's "
                                   "architecture, TensorFlow and the MPI mpi4py loads: a login node can fill a shared "
                                   "cache for compute nodes without a compiler. check: say which load here, "
                                   "compiling nothing (exit 1 if one does not).")
    k.add_argument("action", choices=("build", "check"), help="what to do: build or check")
    k.add_argument("--cache", default=None, metavar="DIR",
                   help="the kernel cache (default: $LABTOOLS_KERNEL_CACHE, else ~/.cache/labtools/ops)")
    k.add_argument("--verbose", action="store_true", help="show TensorFlow's start-up log lines")
    k.set_defaults(fn=_kernels_cmd)
    r = sub.add_parser("reproduce", help="re-execute the notebooks with papermill, regenerate figures/ and the report",
                       formatter_class=_Help,
                       description="Execute the notebooks of a profile with papermill: first train the runs the "
                                   "results store lacks, then write OUT/PROFILE/ (tables as CSV, Markdown and LaTeX; "
                                   "figures as PNG and PDF, each with a provenance sidecar; the executed notebooks in "
                                   "executed/) and OUT/PROFILE/REPORT.md and .html. A failing notebook stops it "
                                   "with the notebook, the cell and the error.\n\n"
                                   f"notebooks: {', '.join(NOTEBOOKS)}")
    r.add_argument("--profile", default="quick", choices=PROFILES, help=PROFILE_HELP)
    r.add_argument("--notebook", action="append", choices=NOTEBOOKS, metavar="NAME",
                   help=f"only this notebook (repeatable): {', '.join(NOTEBOOKS)}")
    r.add_argument("--out", default=None, metavar="DIR",
                   help="where tables, figures and executed notebooks go (default: the project's figures/)")
    r.add_argument("--results", default=None, metavar="DIR",
                   help="results store root: runs are reused from it and added to it (default: the project's "
                        "results/local/; the committed results/ is read-only)")
    r.add_argument("--stored-only", action="store_true",
                   help="run nothing: tables and figures from the runs already stored, marked partial if some are missing")
    r.add_argument("--retime", action="store_true",
                   help="rerun the timed runs (batch sweep, one process per rank) that have no cluster-valid wall "
                        "time; without it a stored run stands for its plan and its time is drawn as 'not a cluster time'")
    r.add_argument("--write-store", action="store_true",
                   help="train into a store marked read-only (the committed results/): for maintainers")
    r.add_argument("--cifar-dir", default=None, metavar="DIR",
                   help="CIFAR-10 folder for every run (default: searched as `labtools data where` does)")
    r.add_argument("--verbose", action="store_true",
                   help="stream the notebooks' own output, TensorFlow's log lines included")
    r.set_defaults(fn=_reproduce)
    rp = sub.add_parser("report", help="write OUT/PROFILE/REPORT.md and .html from the regenerated tables",
                        formatter_class=_Help,
                        description="Render OUT/PROFILE/REPORT.md and REPORT.html from the tables and figures "
                                    "`labtools reproduce` wrote; nothing is trained or re-executed.")
    rp.add_argument("--profile", default="paper", choices=PROFILES, help="which profile's tables: " + ", ".join(PROFILES))
    rp.add_argument("--out", default="figures", metavar="DIR", help="where the profile's tables and figures are")
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
    parser = build_parser()
    ns, extra = parser.parse_known_args(argv)
    if extra:  # said by the subcommand's parser, so the line names `labtools CMD --help`
        parser.commands[ns.cmd].error(f"unrecognized arguments: {' '.join(extra)}")
    ns.argv = argv
    return ns.fn(ns)


if __name__ == "__main__":
    sys.exit(main())
