"""The newcomer's path without crutches: CIFAR-10 where the README says (the project's data/), no
CIFAR10_DIR, commands run from any folder; the committed store is read-only; a second main job on a
busy machine trains nothing; nothing tracked changes."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import nbformat
import pytest

from labtools import data as D, experiments, paths
from labtools.notebook import Context
from labtools.reproduce import reproduce

REPO = Path(__file__).resolve().parents[1]


def _git_status(repo: Path) -> list[str]:  # noqa: the repository's own (fresh_main has its clone's)
    r = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=repo, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


# ------------------------------------------------------------------ data from anywhere, once

def _fake_data(d: Path) -> Path:
    d.mkdir(parents=True)
    for f in D.MD5:
        (d / f).write_bytes(b"x")
    return d


def test_data_is_found_in_the_project_from_any_folder_never_the_current_one(tmp_path, monkeypatch):
    project = tmp_path / "project"
    found = _fake_data(project / "data" / D.FOLDER)
    _fake_data(project / "notebooks" / "data" / D.FOLDER)  # the trap: papermill and engines run in notebooks/
    monkeypatch.delenv("CIFAR10_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(paths, "checkout", lambda: project)
    for cwd in (project, project / "notebooks", tmp_path):
        monkeypatch.chdir(cwd)
        assert D.find_cifar_dir(download=False) == found, cwd
    # a record's project-relative path (provenance.portable_path) resolves from notebooks/ too (a path
    # typed by a user is relative to the current folder first, as on any command line)
    import shutil

    shutil.rmtree(project / "notebooks" / "data")
    monkeypatch.chdir(project / "notebooks")
    assert D.find_cifar_dir("data/cifar-10-batches-py", download=False) == project / "data" / D.FOLDER


def test_a_wheel_install_uses_the_per_user_data_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "checkout", lambda: None)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "share"))
    monkeypatch.delenv("CIFAR10_DIR", raising=False)
    assert paths.data_home() == tmp_path / "share" / "labtools"
    assert D.candidate_dirs()[0] == tmp_path / "share" / "labtools" / D.FOLDER


def test_missing_data_in_a_notebook_is_the_clis_one_sentence(tmp_path, monkeypatch):
    """The quickstart, executed by papermill with an empty data folder: one line, before any engine starts."""
    import papermill as pm
    import jupytext

    empty = tmp_path / "empty"
    empty.mkdir()
    src = tmp_path / "in.ipynb"
    jupytext.write(jupytext.read(REPO / "notebooks" / "00_quickstart.py"), src, fmt="ipynb")
    out = tmp_path / "out.ipynb"
    monkeypatch.setenv("LABTOOLS_RESULTS", str(tmp_path / "results"))  # the kernel inherits it
    with pytest.raises(pm.PapermillExecutionError) as e:
        pm.execute_notebook(str(src), str(out), cwd=str(REPO / "notebooks"), kernel_name="python3",
                            parameters={"profile": "smoke", "cifar_dir": str(empty), "out_dir": str(tmp_path / "fig")},
                            progress_bar=False, log_output=False)
    assert e.value.ename == "DataError"
    errors = [o for c in nbformat.read(out, as_version=4).cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert len(errors) == 1 and len(errors[0].traceback) == 1, errors
    line = errors[0].traceback[0]
    assert line.startswith("DataError: CIFAR-10 folder") and str(empty) in line and "lacks" in line, line
    cli = subprocess.run([sys.executable, "-m", "labtools.cli", "data", "where", "--cifar-dir", str(empty)],
                         capture_output=True, text=True)
    assert cli.stderr.strip() == f"labtools: error: {line.removeprefix('DataError: ')}"
    assert not (tmp_path / "results").exists()  # nothing started, nothing written


# ------------------------------------------------------------------ stored means stored

def test_the_committed_store_is_read_only_for_the_studies(capsys):
    assert experiments.read_only(REPO / "results")
    ctx = Context("quick", "02_strong_scaling", results_root=REPO / "results")
    assert ctx.run_missing is False and "read-only" in capsys.readouterr().out
    assert Context("quick", "02_strong_scaling", results_root=REPO / "results", write_store=True).run_missing


@pytest.mark.notebook
def test_quick_profile_renders_every_output_from_the_committed_store_and_writes_nothing(tmp_path):
    from test_notebooks import EXPECTED_FIGURES, EXPECTED_TABLES  # noqa: the smoke profile's outputs

    status = _git_status(REPO)
    reproduce(profile="quick", out=str(tmp_path / "figures"), results_root=str(REPO / "results"))  # read-only
    out = tmp_path / "figures" / "quick"
    import json

    for t in EXPECTED_TABLES:
        prov = json.loads((out / "tables" / f"{t}.provenance.json").read_text())
        assert not prov["partial"], (t, prov["runs_missing"])
    for f in [f for f in EXPECTED_FIGURES if f != "quickstart_rank_log"]:  # the live demo needs engines
        prov = json.loads((out / "figures" / f"{f}.provenance.json").read_text())
        assert not prov["partial"], (f, prov["runs_missing"])
    assert (out / "REPORT.md").is_file()
    assert _git_status(REPO) == status


# ------------------------------------------------------------------ the main job, twice, from a fresh clone

def _busy_core(stop: threading.Event):
    """One core busy, as a laptop doing other work: a child process spinning until stop is set."""
    p = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    stop.wait()
    p.kill()
    p.wait()


@pytest.mark.notebook
@pytest.mark.mpi
@pytest.mark.slow
def test_a_fresh_clone_without_cifar10_dir_runs_main_twice_and_the_second_trains_nothing(fresh_main):
    first = fresh_main.first_out  # conftest.fresh_main ran it: the data found in the clone's data/
    assert "runs to compute" in first and " 0 runs to compute" not in first, first[-2000:]
    assert fresh_main.git_status() == []
    stop = threading.Event()
    busy = threading.Thread(target=_busy_core, args=(stop,))
    busy.start()
    t0 = time.monotonic()
    try:
        r = fresh_main.main()
    finally:
        stop.set()
        busy.join()
    second = r.stdout
    assert r.returncode == 0, second[-3000:] + r.stderr[-3000:]
    assert "stored runs only" not in second and " 0 runs to compute" in second, second[-2000:]
    assert "[run] started" not in second, second[-2000:]
    assert (fresh_main.figures / "smoke" / "figures" / "fig04_05_batch_sweep.png").is_file()
    assert fresh_main.git_status() == []
    print(f"fresh clone, smoke profile: first main {fresh_main.first_run_s:.0f} s, "
          f"second (one core busy) {time.monotonic() - t0:.0f} s")
