"""Notebooks are jupytext pairs: NAME.py (percent format) is the tracked source, NAME.ipynb is generated
and ignored, and saving a run notebook writes back the very same .py (so JupyterLab never changes a
tracked file; tests/test_browser.py does it in a real browser)."""
import shutil
import subprocess
from pathlib import Path

import jupytext
import nbformat
import pytest

from labtools.studies import NOTEBOOKS, STUDIES

REPO = Path(__file__).resolve().parents[1]
NB = REPO / "notebooks"


def _as_saved_after_a_run(nb):
    """What JupyterLab holds after running every cell: outputs, counts, and the cell metadata it adds."""
    nb = nbformat.from_dict(nb.dict() if hasattr(nb, "dict") else nb)
    for i, c in enumerate(nb.cells):
        if c.cell_type == "code":
            c.execution_count = i + 1
            c.outputs = [nbformat.v4.new_output("stream", name="stdout", text=f"cell {i}\n")]
            c.metadata.update({"execution": {"iopub.status.busy": "2026-01-01T00:00:00Z"}, "scrolled": True,
                               "collapsed": False})
    nb.metadata["language_info"] = {"name": "python", "version": "3.11.7"}
    nb.metadata.setdefault("widgets", {})["application/vnd.jupyter.widget-state+json"] = {"state": {}}
    return nb


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_saving_a_run_notebook_writes_back_the_same_source(name):
    py = NB / f"{name}.py"
    text = py.read_text()
    nb = jupytext.reads(text, fmt="py:percent")
    assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells), f"{name} has no papermill parameters cell"
    # the pair as `make notebooks` makes it, then as JupyterLab saves it after a run
    ipynb = nbformat.reads(jupytext.writes(nb, fmt="ipynb"), as_version=4)
    assert jupytext.writes(ipynb, fmt="py:percent") == text, f"{py.name} is not what jupytext writes for it: run `make notebooks`"
    assert jupytext.writes(_as_saved_after_a_run(ipynb), fmt="py:percent") == text, \
        f"saving {name}.ipynb after a run would change {py.name}"


def test_generated_notebooks_and_data_are_ignored_by_git(tmp_path):
    if not (REPO / ".git").exists() or not shutil.which("git"):
        pytest.skip("not a git checkout")
    paths = [f"notebooks/{NOTEBOOKS[0]}.ipynb", "data/cifar-10-batches-py/data_batch_1",
             "notebooks/data/cifar-10-batches-py/data_batch_1", "data/cifar-10-python.tar.gz"]
    r = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=REPO, capture_output=True, text=True)
    assert r.stdout.split() == paths, r.stdout + r.stderr
    tracked = subprocess.run(["git", "ls-files", "notebooks"], cwd=REPO, capture_output=True, text=True).stdout.split()
    assert not [t for t in tracked if t.endswith(".ipynb")], tracked


def test_registry_names_every_notebook_and_every_study_has_one():
    on_disk = sorted(p.stem for p in NB.glob("[0-9]*.py"))
    assert on_disk == sorted(NOTEBOOKS)
    for name, cls in STUDIES.items():
        assert cls.notebook == name and set(cls.PARAMS) == {"smoke", "quick", "paper"}
        assert f"{cls.__name__}" in (NB / f"{name}.py").read_text(), f"{name} does not use its study"
