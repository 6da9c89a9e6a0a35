"""`labtools reproduce`: papermill re-executes the notebooks for a profile and regenerates figures/.

Outputs go to OUT/PROFILE/: tables (CSV, Markdown, LaTeX), figures (PNG, PDF), each with a
provenance sidecar, and the executed notebooks in OUT/PROFILE/executed/. A failing notebook stops
the run with the notebook, the failing cell and the error; what earlier notebooks wrote stays.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from .studies import NOTEBOOKS

ROOT = Path(__file__).resolve().parents[1]


class ReproduceError(RuntimeError):
    pass


def _rel(p: Path) -> str:
    """papermill stores the paths it is given in the executed notebook: keep them machine-neutral."""
    try:
        return os.path.relpath(p)
    except ValueError:  # another drive (Windows)
        return str(p)


def reproduce(profile: str = "quick", notebooks=None, out="figures", results_root="results",
              notebook_dir: str | os.PathLike | None = None, runner: str = "pool", run_missing: bool = True) -> list[Path]:
    import papermill as pm

    nb_dir = Path(notebook_dir) if notebook_dir else ROOT / "notebooks"
    names = notebooks or NOTEBOOKS
    unknown = [n for n in names if not (nb_dir / f"{n}.ipynb").exists()]
    if unknown:
        raise ReproduceError(f"no notebook {', '.join(unknown)} in {nb_dir}; choose from {', '.join(NOTEBOOKS)}")
    out_dir = Path(out).resolve() / profile
    executed = out_dir / "executed"
    executed.mkdir(parents=True, exist_ok=True)
    # The engines' launcher (mpiexec) and the kernel must come from this environment.
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    done = []
    for name in names:
        t = time.time()
        print(f"[reproduce] {name} (profile {profile}) ...", flush=True)
        target = executed / f"{name}.ipynb"
        try:
            pm.execute_notebook(_rel(nb_dir / f"{name}.ipynb"), _rel(target), cwd=str(nb_dir), kernel_name="python3",
                                # relative to the notebooks' folder: executed copies name no machine paths
                                parameters={"profile": profile, "out_dir": os.path.relpath(out_dir, nb_dir),
                                            "results_root": os.path.relpath(Path(results_root).resolve(), nb_dir),
                                            "runner": runner, "run_missing": run_missing},
                                progress_bar=False, log_output=True, stdout_file=sys.stdout, stderr_file=sys.stderr)
        except pm.PapermillExecutionError as e:
            raise ReproduceError(f"{name}: cell {e.exec_count} raised {e.ename}: {e.evalue} "
                                 f"(executed notebook with the error: {target}; earlier outputs are kept)") from None
        print(f"[reproduce] {name} done in {time.time() - t:.0f}s -> {target}", flush=True)
        done.append(target)
    from .report import StaleTable, write_report

    try:
        for path in write_report(out_dir):
            print(f"[reproduce] report -> {_rel(path)}", flush=True)
    except (StaleTable, FileNotFoundError) as e:  # a notebook not re-run since the tables changed, or not run at all
        print(f"[reproduce] no report: {e}", flush=True)
    return done
