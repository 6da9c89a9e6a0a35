"""Where things live, anchored to stable places and never to the current folder.

papermill and the engines run in notebooks/, a user may start a command anywhere: a path that
depends on the working directory finds a different `data/` in each. So every default is anchored
to the project checkout when the package runs from one (an editable install), and to the per-user
folders of the platform (platformdirs) when it runs from a wheel.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

LOCAL_STORE = Path("results") / "local"  # the store `make main` computes into (ignored by git)
COMMITTED_STORE = Path("results")  # the committed records (read-only: labtools.experiments.read_only)
FIGURES = Path("figures")  # tables, figures and REPORT.md per profile


@lru_cache(maxsize=1)
def checkout() -> Path | None:
    """The project checkout this package is imported from, or None (a wheel in site-packages)."""
    root = Path(__file__).resolve().parents[1]
    py = root / "pyproject.toml"
    if py.is_file() and (root / "notebooks").is_dir() and 'name = "labtools"' in py.read_text(errors="replace"):
        return root
    return None


def project_root() -> Path:
    """The checkout, else the current folder (a wheel user's project is where they work)."""
    return checkout() or Path.cwd()


def data_home() -> Path:
    """Where CIFAR-10 is looked for second-to-last and downloaded to: $LABTOOLS_DATA_HOME (e.g. a node's
    local scratch), else <checkout>/data, else the per-user data folder (~/.local/share/labtools on Linux)."""
    if os.environ.get("LABTOOLS_DATA_HOME"):
        return Path(os.environ["LABTOOLS_DATA_HOME"]).expanduser()
    root = checkout()
    if root is not None:
        return root / "data"
    import platformdirs  # only a wheel install needs it

    return platformdirs.user_data_path("labtools")


def local_store() -> Path:
    """The default results store of the studies: $LABTOOLS_RESULTS (e.g. a cluster's shared folder), else
    <project>/results/local."""
    env = os.environ.get("LABTOOLS_RESULTS")
    return Path(env).expanduser() if env else project_root() / LOCAL_STORE


def figures_root() -> Path:
    return project_root() / FIGURES


def resolve(p: str | Path) -> Path:
    """A path as a user or a record gives it: absolute, or relative to the current folder if it exists
    there, else to the project root (records keep paths relative to the project: provenance.portable_path)."""
    path = Path(p).expanduser()
    if path.is_absolute() or path.exists():
        return path
    anchored = project_root() / path
    return anchored if anchored.exists() else path
