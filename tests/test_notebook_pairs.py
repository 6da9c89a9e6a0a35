"""Notebooks are jupytext pairs: the .py source and the .ipynb hold the same cells, and the registry names them all."""
from pathlib import Path

import jupytext
import nbformat
import pytest

from labtools.studies import NOTEBOOKS, STUDIES

NB = Path(__file__).resolve().parents[1] / "notebooks"


def _cells(nb):
    return [(c.cell_type, c.source.strip(), tuple(c.metadata.get("tags", []))) for c in nb.cells]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_pair_holds_the_same_cells(name):
    py, ipynb = NB / f"{name}.py", NB / f"{name}.ipynb"
    assert py.exists() and ipynb.exists(), f"{name} needs both {py.name} and {ipynb.name}"
    a, b = jupytext.read(py), nbformat.read(ipynb, as_version=4)
    assert _cells(a) == _cells(b), f"{py.name} and {ipynb.name} disagree: run `jupytext --sync notebooks/{py.name}`"
    assert any("parameters" in c.metadata.get("tags", []) for c in b.cells), f"{name} has no papermill parameters cell"
    assert not any(c.get("outputs") for c in b.cells if c.cell_type == "code"), f"{ipynb.name} is committed with outputs"


def test_registry_names_every_notebook_and_every_study_has_one():
    on_disk = sorted(p.stem for p in NB.glob("*.ipynb"))
    assert on_disk == sorted(NOTEBOOKS)
    for name, cls in STUDIES.items():
        assert cls.notebook == name and set(cls.PARAMS) == {"smoke", "quick", "paper"}
        assert f"{cls.__name__}" in (NB / f"{name}.py").read_text(), f"{name} does not use its study"
