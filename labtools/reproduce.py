"""`labtools reproduce`: papermill re-executes the notebooks for a profile and regenerates figures/.

Outputs go to OUT/PROFILE/: tables (CSV, Markdown, LaTeX), figures (PNG, PDF), each with a
provenance sidecar, and the executed notebooks in OUT/PROFILE/executed/. A failing notebook stops
the run with the notebook, the failing cell and the error; what earlier notebooks wrote stays.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from .studies import NOTEBOOKS

ROOT = Path(__file__).resolve().parents[1]


class ReproduceError(RuntimeError):
    pass


def notebooks_dir() -> Path:
    """The notebooks: a checkout's notebooks/ (an editable install), else the copy a wheel installs
    under sys.prefix/share/labtools/notebooks (pyproject's data-files)."""
    for d in (ROOT / "notebooks", Path(sys.prefix) / "share" / "labtools" / "notebooks"):
        if (d / f"{NOTEBOOKS[0]}.ipynb").exists():
            return d
    raise ReproduceError(f"no notebooks: neither a checkout's {ROOT / 'notebooks'} nor the installed "
                         f"{Path(sys.prefix) / 'share' / 'labtools' / 'notebooks'} holds them; reinstall labtools "
                         "from its wheel or run from a clone")


def _rel(p: Path) -> str:
    """papermill stores the paths it is given in the executed notebook: keep them machine-neutral."""
    try:
        return os.path.relpath(p)
    except ValueError:  # another drive (Windows)
        return str(p)


LIVE_DEMOS = ("00_quickstart",)  # notebooks that always train (they show the pool at work): skipped by --stored-only


def plan_work(profile: str, names, out_dir: Path, results_root) -> dict:
    """{science key: (work, config)} of the planned runs the store lacks, over all notebooks (each run
    counted once: studies share runs through the store)."""
    from .experiments import Store
    from .live import work
    from .studies import study

    store, todo = Store(results_root), {}
    for name in names:
        for p in study(name, profile, out_dir=out_dir, results_root=results_root).planned():
            key = p.cfg.science_key()
            if name in LIVE_DEMOS or store.find(p) is None:
                todo.setdefault(key if name not in LIVE_DEMOS else name, (work(p.cfg), p.cfg))
    return todo


def scrub(nb_path: Path) -> None:
    """Drop papermill's and Jupyter's clock times from an executed notebook: re-rendering unchanged
    inputs then writes the same file."""
    import hashlib

    import nbformat

    nb = nbformat.read(nb_path, as_version=4)
    for k in ("duration", "start_time", "end_time"):
        nb.metadata.get("papermill", {}).pop(k, None)
    for i, cell in enumerate(nb.cells):
        # nbformat gives id-less cells (jupytext pairs carry none) a random id on every execution
        cell.id = f"c{i:02d}-{hashlib.sha1(cell.source.encode()).hexdigest()[:8]}"
        cell.metadata.pop("execution", None)
        for k in ("duration", "start_time", "end_time"):
            cell.metadata.get("papermill", {}).pop(k, None)
    nbformat.write(nb, nb_path)


def _data_needed(todo: dict) -> None:
    """Runs need CIFAR-10: say so in one sentence before any notebook starts, not as a traceback."""
    from .data import DataError, find_cifar_dir

    if todo:
        try:
            find_cifar_dir(download=True)
        except DataError as e:
            raise ReproduceError(f"{len(todo)} runs need CIFAR-10, and here: {e} (`--stored-only` renders the stored "
                                 "runs without data)") from None


def reproduce(profile: str = "quick", notebooks=None, out="figures", results_root="results/local",
              notebook_dir: str | os.PathLike | None = None, runner: str = "pool", run_missing: bool = True,
              verbose: bool = False) -> list[Path]:
    """Execute the notebooks of a profile; with run_missing, first compute what the store lacks.

    The terminal shows one line per notebook and per run started/finished and an overall bar with the
    time left (labtools.live); verbose=True streams the notebooks' own output instead."""
    import papermill as pm

    from .live import StoreWatcher, overall_bar

    nb_dir = Path(notebook_dir) if notebook_dir else notebooks_dir()
    names = list(notebooks or NOTEBOOKS)
    unknown = [n for n in names if not (nb_dir / f"{n}.ipynb").exists()]
    if unknown:
        raise ReproduceError(f"no notebook {', '.join(unknown)} in {nb_dir}; choose from {', '.join(NOTEBOOKS)}")
    if not run_missing:
        for n in [n for n in names if n in LIVE_DEMOS]:
            print(f"[reproduce] {n} skipped: it is a live demo that trains, and --stored-only trains nothing", flush=True)
        names = [n for n in names if n not in LIVE_DEMOS]
    out_dir = Path(out).resolve() / profile
    executed = out_dir / "executed"
    executed.mkdir(parents=True, exist_ok=True)
    results_root = Path(results_root)
    todo = plan_work(profile, names, out_dir, results_root) if run_missing else {}
    _data_needed(todo)
    print(f"[reproduce] profile {profile}: {len(names)} notebooks, results store {_rel(results_root)}, "
          + (f"{len(todo)} runs to compute" if run_missing else "stored runs only (nothing is trained)"), flush=True)
    # The engines' launcher (mpiexec) and the kernel must come from this environment.
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    done, t_all = [], time.time()
    bar = overall_bar(sum(w for w, _ in todo.values()), len(todo)) if todo else None
    try:
        with StoreWatcher(results_root, bar) if todo else nullcontext():
            for name in names:
                t = time.time()
                _say(bar, f"[reproduce] {name} ...")
                target = executed / f"{name}.ipynb"
                try:
                    pm.execute_notebook(
                        _rel(nb_dir / f"{name}.ipynb"), _rel(target), cwd=str(nb_dir), kernel_name="python3",
                        # relative to the notebooks' folder: executed copies name no machine paths
                        parameters={"profile": profile, "out_dir": os.path.relpath(out_dir, nb_dir),
                                    "results_root": os.path.relpath(results_root.resolve(), nb_dir),
                                    "runner": runner, "run_missing": run_missing},
                        # the kernel's own start-up warnings (e.g. TCP without encryption) are not the run's news
                        extra_arguments=[] if verbose else ["--IPKernelApp.log_level=ERROR"],
                        progress_bar=False, log_output=verbose, **(dict(stdout_file=sys.stdout, stderr_file=sys.stderr)
                                                                   if verbose else {}))
                except pm.PapermillExecutionError as e:
                    raise ReproduceError(f"{name}: cell {e.exec_count} raised {e.ename}: {e.evalue} (executed notebook "
                                         f"with the error: {_rel(target)}; earlier outputs are kept)") from None
                scrub(target)
                _say(bar, f"[reproduce] {name} done in {time.time() - t:.0f} s -> {_rel(target)}")
                done.append(target)
    finally:
        if bar is not None:
            bar.close()
    from .report import StaleTable, write_report

    try:
        for path in write_report(out_dir):
            print(f"[reproduce] report -> {_rel(path)}", flush=True)
    except (StaleTable, FileNotFoundError) as e:  # a notebook not re-run since the tables changed, or not run at all
        print(f"[reproduce] no report: {e}", flush=True)
    print(f"[reproduce] {len(done)} notebooks in {time.time() - t_all:.0f} s; tables and figures in {_rel(out_dir)}",
          flush=True)
    return done


def _say(bar, line: str) -> None:
    (bar.write if bar is not None else print)(line)
    sys.stdout.flush()
