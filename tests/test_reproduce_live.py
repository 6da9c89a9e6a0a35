"""`labtools reproduce`'s terminal view and its promise that re-rendering unchanged inputs changes no byte."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import nbformat
import pandas as pd

from labtools import live, provenance, reproduce, tables

ROOT = Path(__file__).resolve().parents[1]


def _a_stored_run() -> Path:
    runs = sorted(p.parent for p in (ROOT / "results").glob("scaling-paper/*/summary.json"))
    assert runs, "the committed records are missing"
    return runs[0]


def test_watcher_prints_each_new_run_once_and_ignores_runs_already_there(tmp_path):
    src = _a_stored_run()
    old = tmp_path / "exp" / "old-run"
    shutil.copytree(src, old)
    out = io.StringIO()
    w = live.StoreWatcher(tmp_path, bar=None, out=out)
    w.scan()
    assert out.getvalue() == ""  # reused, not run
    shutil.copytree(src, tmp_path / "exp" / "new-run")
    w.scan()
    w.scan()
    lines = out.getvalue().splitlines()
    cfg = json.loads((src / "manifest.json").read_text())["config"]
    acc = json.loads((src / "summary.json").read_text())["test_acc"]
    assert len(lines) == 2 and lines[0].startswith("[run] started") and lines[1].startswith("[run] finished")
    assert f"np={cfg['np']}" in lines[1] and f"seed={cfg['seed']}" in lines[1] and f"{100 * acc:.1f}%" in lines[1]
    assert w.started == 1 and w.finished == 1


def test_scrub_removes_every_clock_time(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.metadata["papermill"] = {"start_time": "2026-01-01T00:00:00", "end_time": "x", "duration": 3.2,
                                "parameters": {"profile": "paper"}}
    cell = nbformat.v4.new_code_cell("1")
    cell.metadata.update({"execution": {"iopub.status.busy": "2026"},
                          "papermill": {"duration": 0.1, "start_time": "a", "end_time": "b", "status": "completed"}})
    nb.cells.append(cell)
    p = tmp_path / "x.ipynb"
    nbformat.write(nb, p)
    reproduce.scrub(p)
    text = p.read_text()
    assert "2026" not in text and "duration" not in text and "start_time" not in text
    back = nbformat.read(p, as_version=4)
    assert back.metadata.papermill["parameters"] == {"profile": "paper"}
    assert back.cells[0].metadata.papermill == {"status": "completed"}
    reproduce.scrub(p)
    assert p.read_text() == text  # cell ids too: derived from the cell, not drawn at random


def test_a_table_saved_twice_from_the_same_inputs_is_the_same_bytes(tmp_path):
    df = pd.DataFrame({"np": [2, 4], "test_acc_pct": [61.0, 46.5]})
    a = {p.name: p.read_bytes() for p in tables.save_table(df, tmp_path, "t", provenance={"profile": "x"},
                                                             run_ids=["r1"])}
    b = {p.name: p.read_bytes() for p in tables.save_table(df, tmp_path, "t", provenance={"profile": "x"},
                                                             run_ids=["r1"])}
    assert a == b
    side = json.loads(a["t.provenance.json"])
    assert "date_utc" not in side and side["git_commit"] == provenance.code_commit()


def test_code_commit_is_the_last_commit_that_changed_the_code():
    c = provenance.code_commit()
    if c is None:  # not a git checkout (an sdist): nothing to compare
        return
    import subprocess

    sha = subprocess.run(["git", "log", "-1", "--format=%H", "--", "labtools", "notebooks", "pyproject.toml"],
                         cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert c.split("+")[0] == sha


def test_watcher_keeps_its_store_when_papermill_changes_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "store").mkdir()
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    w = live.StoreWatcher("store", bar=live.overall_bar(1000, 2), out=out)
    monkeypatch.chdir(tmp_path / "notebooks")  # what papermill's execute_notebook(cwd=...) does meanwhile
    shutil.copytree(_a_stored_run(), tmp_path / "store" / "exp" / "run")
    w.scan()
    assert "[run] finished" in out.getvalue() and "; 1 run done, ~" in out.getvalue()


def test_papermill_shuts_kernels_down_without_a_sigint(tmp_path):
    """jupyter_client's shutdown_kernel first sends the kernel SIGINT; one that lands while the kernel is in
    a message handler prints "[IPKernelApp] ERROR | KeyboardInterrupt caught in kernel." on the terminal of
    `labtools reproduce`. Its kernel manager ends kernels by the shutdown request alone. Here a kernel records
    every SIGINT it gets (the handler ipykernel restores after a cell), once under jupyter_client's own
    manager (the signal is sent) and once under reproduce's (none is)."""
    import asyncio

    from jupyter_client.manager import AsyncKernelManager

    async def sigints(cls) -> str:
        marker = tmp_path / cls.__name__
        km = cls(kernel_name="python3")
        await km.start_kernel(extra_arguments=["--IPKernelApp.log_level=ERROR"])
        kc = km.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=60)
            reply = await kc.execute_interactive(
                f"get_ipython().kernel.saved_sigint_handler = lambda *a: open({str(marker)!r}, 'a').write('SIGINT')",
                timeout=60)
            assert reply["content"]["status"] == "ok", reply["content"]
        finally:
            kc.stop_channels()
            await km.shutdown_kernel()
        assert not await km.is_alive()  # the kernel ended all the same
        return marker.read_text() if marker.exists() else ""

    assert asyncio.run(sigints(AsyncKernelManager)) == "SIGINT"
    assert asyncio.run(sigints(reproduce.kernel_manager_class())) == ""
