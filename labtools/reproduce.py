"""`labtools reproduce`: papermill re-executes the notebooks for a profile and regenerates figures/.

Outputs go to OUT/PROFILE/: tables (CSV, Markdown, LaTeX), figures (PNG, PDF), each with a
provenance sidecar, and the executed notebooks in OUT/PROFILE/executed/. A failing notebook stops
the run with the notebook, the failing cell and the error; what earlier notebooks wrote stays.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from . import paths
from .studies import NOTEBOOKS


class ReproduceError(RuntimeError):
    pass


def notebooks_dir() -> Path:
    """The notebooks' sources: a checkout's notebooks/ (an editable install), else the copy a wheel installs
    under sys.prefix/share/labtools/notebooks (pyproject's data-files)."""
    installed = Path(sys.prefix) / "share" / "labtools" / "notebooks"
    checkout = paths.checkout()
    for d in ([checkout / "notebooks"] if checkout else []) + [installed]:
        if notebook_source(d, NOTEBOOKS[0]) is not None:
            return d
    raise ReproduceError(f"no notebooks: neither a checkout's notebooks/ nor the installed {installed} holds them; "
                         "reinstall labtools from its wheel or run from a clone")


def _rel(p: Path) -> str:
    """papermill stores the paths it is given in the executed notebook: keep them machine-neutral."""
    try:
        return os.path.relpath(p)
    except ValueError:  # another drive (Windows)
        return str(p)


LIVE_DEMOS = ("00_quickstart",)  # notebooks that start a pool (they show it at work): skipped by --stored-only


def kernel_manager_class():
    """papermill's kernel manager, less the SIGINT it sends a kernel it shuts down.

    jupyter_client's shutdown_kernel interrupts the kernel first (SIGINT to its process group), then
    asks it to shut down. A notebook papermill has finished has nothing to interrupt, and a kernel that is
    still inside a message handler when the signal lands logs "[IPKernelApp] ERROR | KeyboardInterrupt
    caught in kernel." to our terminal. The shutdown request (control channel) ends the kernel, and
    jupyter_client still terminates, then kills, one that does not end in time."""
    from jupyter_client.manager import AsyncKernelManager

    class NoInterruptAtShutdown(AsyncKernelManager):
        async def _async_interrupt_kernel(self) -> None:
            if self.shutting_down:  # set by shutdown_kernel just before it interrupts
                return
            await super()._async_interrupt_kernel()

    return NoInterruptAtShutdown


def plan_work(profile: str, names, out_dir: Path, results_root, retime: bool = False) -> dict:
    """{science key: (work, config)} of the planned runs the store lacks, over all notebooks (each run
    counted once: studies share runs through the store)."""
    from .experiments import Store
    from .live import work
    from .studies import study

    store, todo = Store(results_root), {}
    for name in names:
        for p in study(name, profile, out_dir=out_dir, results_root=results_root, run_missing=False).planned():
            key = p.cfg.science_key()
            if store.find(p, retime=retime) is None:
                todo.setdefault(key, (work(p.cfg), p.cfg))
    return todo


def scrub(nb_path: Path, input_path: str | None = None) -> None:
    """Drop papermill's and Jupyter's clock times from an executed notebook: re-rendering unchanged
    inputs then writes the same file. input_path: the source to name instead of the temporary copy."""
    import hashlib

    import nbformat

    nb = nbformat.read(nb_path, as_version=4)
    for k in ("duration", "start_time", "end_time"):
        nb.metadata.get("papermill", {}).pop(k, None)
    if input_path and "papermill" in nb.metadata:
        nb.metadata.papermill["input_path"] = input_path
    for i, cell in enumerate(nb.cells):
        # nbformat gives id-less cells (jupytext pairs carry none) a random id on every execution
        cell.id = f"c{i:02d}-{hashlib.sha1(cell.source.encode()).hexdigest()[:8]}"
        cell.metadata.pop("execution", None)
        for k in ("duration", "start_time", "end_time"):
            cell.metadata.get("papermill", {}).pop(k, None)
    nbformat.write(nb, nb_path)


def _data_needed(todo: dict, cifar_dir=None) -> str | None:
    """Runs need CIFAR-10: say so in one sentence before any notebook starts, not as a traceback. The
    folder found here is the one every notebook and engine uses (a notebook parameter), as records keep
    paths (provenance.portable_path): the executed notebooks name no machine path."""
    from .data import DataError, find_cifar_dir
    from .provenance import portable_path

    if not todo:
        return None
    try:
        return portable_path(find_cifar_dir(cifar_dir, download=True))
    except DataError as e:
        raise ReproduceError(f"{len(todo)} runs need CIFAR-10, and here: {e} (`--stored-only` renders the stored "
                             "runs without data)") from None


def notebook_source(nb_dir: Path, name: str) -> Path | None:
    """The tracked source of a notebook: notebooks/NAME.py (jupytext percent format); the .ipynb beside
    it is generated and ignored by git, so that working in JupyterLab never changes a tracked file."""
    py = nb_dir / f"{name}.py"
    return py if py.is_file() else None


def _as_ipynb(src: Path, dest: Path) -> Path:
    import jupytext

    jupytext.write(jupytext.read(src), dest, fmt="ipynb")
    return dest


def reproduce(profile: str = "quick", notebooks=None, out=None, results_root=None,
              notebook_dir: str | os.PathLike | None = None, runner: str = "pool", run_missing: bool = True,
              verbose: bool = False, cifar_dir=None, retime: bool = False, write_store: bool = False) -> list[Path]:
    """Execute the notebooks of a profile; with run_missing, first compute what the store lacks.

    out, results_root: default figures/ and results/local/ of the project (labtools.paths), wherever
    this is called from. retime: rerun timed plans that have no cluster-timed record. write_store:
    train into a store marked read-only (the committed records).
    The terminal shows one line per notebook and per run started/finished and an overall bar with the
    time left (labtools.live); verbose=True streams the notebooks' own output instead."""
    import tempfile

    import papermill as pm

    from .experiments import read_only
    from .live import StoreWatcher, overall_bar

    nb_dir = Path(notebook_dir) if notebook_dir else notebooks_dir()
    names = list(notebooks or NOTEBOOKS)
    unknown = [n for n in names if notebook_source(nb_dir, n) is None]
    if unknown:
        raise ReproduceError(f"no notebook {', '.join(unknown)} in {nb_dir}; choose from {', '.join(NOTEBOOKS)}")
    results_root = Path(results_root) if results_root else paths.local_store()
    why = read_only(results_root)
    if why and run_missing and not write_store:
        print(f"[reproduce] {_rel(results_root)} is a read-only store ({why}): rendering its runs, training none "
              "(--write-store trains into it)", flush=True)
        run_missing = False
    if not run_missing:
        for n in [n for n in names if n in LIVE_DEMOS]:
            print(f"[reproduce] {n} skipped: it is a live demo that trains, and --stored-only trains nothing", flush=True)
        names = [n for n in names if n not in LIVE_DEMOS]
    out_dir = (Path(out) if out else paths.figures_root()).resolve() / profile
    executed = out_dir / "executed"
    executed.mkdir(parents=True, exist_ok=True)
    todo = plan_work(profile, names, out_dir, results_root, retime) if run_missing else {}
    found = _data_needed(todo, cifar_dir)
    print(f"[reproduce] profile {profile}: {len(names)} notebooks, results store {_rel(results_root)}, "
          + (f"{len(todo)} runs to compute" if run_missing else "stored runs only (nothing is trained)"), flush=True)
    # The engines' launcher (mpiexec) and the kernel must come from this environment.
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    done, t_all = [], time.time()
    bar = overall_bar(sum(w for w, _ in todo.values()), len(todo)) if todo else None
    sources = Path(tempfile.mkdtemp(prefix="labtools-notebooks-"))
    try:
        with StoreWatcher(results_root, bar) if todo else nullcontext():
            for name in names:
                t = time.time()
                _say(bar, f"[reproduce] {name} ...")
                target = executed / f"{name}.ipynb"
                try:
                    pm.execute_notebook(
                        str(_as_ipynb(notebook_source(nb_dir, name), sources / f"{name}.ipynb")), _rel(target),
                        cwd=str(nb_dir), kernel_name="python3",
                        # relative to the notebooks' folder: executed copies name no machine paths
                        parameters={"profile": profile, "out_dir": os.path.relpath(out_dir, nb_dir),
                                    "results_root": os.path.relpath(results_root.resolve(), nb_dir),
                                    "runner": runner, "run_missing": run_missing, "cifar_dir": found,
                                    "retime": retime, "write_store": write_store},
                        # the kernel's own start-up warnings (e.g. TCP without encryption) are not the run's news
                        extra_arguments=[] if verbose else ["--IPKernelApp.log_level=ERROR"],
                        progress_bar=False, log_output=verbose, kernel_manager_class=kernel_manager_class(),
                        **(dict(stdout_file=sys.stdout, stderr_file=sys.stderr) if verbose else {}))
                except pm.PapermillExecutionError as e:
                    raise ReproduceError(f"{name}: cell {e.exec_count} raised {e.ename}: {e.evalue} (executed notebook "
                                         f"with the error: {_rel(target)}; earlier outputs are kept)") from None
                scrub(target, input_path=_rel(notebook_source(nb_dir, name)))
                _say(bar, f"[reproduce] {name} done in {time.time() - t:.0f} s -> {_rel(target)}")
                done.append(target)
    finally:
        shutil.rmtree(sources, ignore_errors=True)
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
