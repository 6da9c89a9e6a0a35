"""JupyterLab in a real browser, as a user meets it: headless Chromium (Debian's `chromium`, driven by
Playwright) opens notebooks/00_quickstart.ipynb in a JupyterLab started in the project's notebooks/
folder, with CIFAR10_DIR unset and the data in the project's data/ folder (as the README says to put
it), runs all cells from the Run menu, saves with Ctrl+S, and checks what a researcher sees: each
engine's output under its ``[stdout:N]`` prefix (the %%px cell and the training cell, whose lines
stream while it runs), the tqdm.auto progress bar widget, the figure inline, no traceback anywhere;
and that `git status` is what it was before: outputs live only in the generated, ignored .ipynb.

The notebook is the real one (quick profile), made from its tracked .py as `make notebooks` makes it.
Its results go to a store of the test's own ($LABTOOLS_RESULTS), so the demo trains here whatever
earlier runs left in results/local/. A screenshot of the whole notebook is kept, pass or fail, at
build/ci-artifacts/quickstart-jupyterlab.png (and the server's log beside it). Jupyter's settings,
workspaces, runtime files and IPython profile are in tmp_path.

Missing Chromium or Playwright: a failure in CI ($CI set), a skip elsewhere.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from contextlib import contextmanager
from pathlib import Path

import nbformat
import psutil
import pytest

from labtools import procs

pytestmark = [pytest.mark.browser, pytest.mark.notebook, pytest.mark.mpi, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NOTEBOOK = "00_quickstart"
ARTIFACTS = REPO / "build" / "ci-artifacts"
SCREENSHOT = ARTIFACTS / "quickstart-jupyterlab.png"
RUN_TIMEOUT = 8 * 60  # run all cells; about a minute on an idle 2-core machine
START_TIMEOUT = 120   # JupyterLab answering, the page built, the kernel started

TRAINING = r"^[^#\n]*\b(pool\.run|study\.train)\("  # the training cell: the call outside a comment
STDERR = "application/vnd.jupyter.stderr"
# One object per code cell of the open notebook, read from the DOM.
CELLS_JS = """() => Array.from(document.querySelectorAll(
    '.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell.jp-CodeCell')).map(c => ({
  source: Array.from(c.querySelectorAll('.jp-InputArea-editor .cm-line')).map(l => l.textContent).join('\\n'),
  prompt: (c.querySelector('.jp-InputArea-prompt') || {}).textContent || '',
  text: Array.from(c.querySelectorAll('.jp-OutputArea-output')).map(o => o.innerText).join('\\n'),
  outputs: c.querySelectorAll('.jp-OutputArea-output').length,
  stderr: Array.from(c.querySelectorAll('.jp-OutputArea-output[data-mime-type="%s"], .jp-RenderedText[data-mime-type="%s"]'))
               .map(o => o.innerText),
  progress: Array.from(c.querySelectorAll('.jp-OutputArea-output .jupyter-widgets:is(.widget-hprogress, '
                     + '.widget-vprogress, .widget-progress) .progress .progress-bar'))
               .map(b => b.style.width || ''),
  images: Array.from(c.querySelectorAll('.jp-OutputArea-output img'))
               .map(i => ({complete: i.complete, width: i.naturalWidth, height: i.naturalHeight})),
}))""" % (STDERR, STDERR)


def _missing(reason: str, hint: str):
    """A missing browser piece fails in CI (one sentence: reason and hint), and skips elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}: {hint}.", pytrace=False)
    pytest.skip(f"{reason}.")


def _chromium() -> str:
    """Debian's chromium, and Playwright to drive it. Checked in the test itself, so that in CI a missing
    one is that test's failure (not a setup error) and no JupyterLab is started for nothing."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        _missing("Chromium is not installed (no `chromium` on PATH), so JupyterLab cannot be tested in a browser",
                 "install Debian's chromium package (apt-get install -y chromium; .ci/run does this as root)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _missing("The playwright Python package is not installed, so JupyterLab cannot be tested in a browser",
                 "install the test extras (pip install -e '.[test]'; it drives Debian's chromium, no `playwright install`)")
    return exe


# ------------------------------------------------------------------ JupyterLab for one test
class Lab:
    def __init__(self, root: Path, env: dict, log_dir: Path):
        self.root, self.token = root, secrets.token_hex(16)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / "jupyterlab.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [str(BIN / "jupyter"), "lab", "--no-browser", f"--port={self.port}", "--ServerApp.port_retries=0",
             "--ServerApp.ip=127.0.0.1", f"--ServerApp.token={self.token}", f"--ServerApp.root_dir={root}",
             "--allow-root"],
            cwd=root, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self.seen: dict[int, psutil.Process] = {}  # every process seen below the server (kernel, pool, MPI)
        self.cluster_ids: set[str] = set()         # ipyparallel clusters started by the kernel

    def url(self, path: str) -> str:
        return f"{self.base}/lab/tree/{path}?token={self.token}"

    def api(self, path: str, method: str = "GET"):
        req = urllib.request.Request(self.base + path, method=method, headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            body = r.read()
        return json.loads(body) if body else None

    def log_tail(self, n: int = 3000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-n:]

    def wait_ready(self, timeout: float = START_TIMEOUT):
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                pytest.fail(f"JupyterLab exited with code {self.proc.returncode} at start:\n{self.log_tail()}")
            try:
                self.api("/api/status")
                return
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        pytest.fail(f"JupyterLab did not answer on port {self.port} within {timeout:.0f}s:\n{self.log_tail()}")

    def kernels(self) -> list[dict]:
        return self.api("/api/kernels")

    def track(self):
        """Remember the server's descendants and the ipyparallel cluster ids they carry (for cleanup)."""
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return
        for p in kids:
            if p.pid in self.seen:
                continue
            self.seen[p.pid] = p
            try:
                cid = p.environ().get("IPP_CLUSTER_ID")
            except psutil.Error:
                cid = None
            if cid:
                self.cluster_ids.add(cid)

    def shutdown(self) -> list[str]:
        """Kernels through the REST API, then the server, then anything of theirs still alive (killed).
        Returns what had to be killed after the kernels were shut down."""
        self.track()
        try:
            for k in self.kernels():
                self.api(f"/api/kernels/{k['id']}", "DELETE")
        except (urllib.error.URLError, OSError) as e:
            print(f"test_browser: shutting the kernels down: {e}", file=sys.stderr)
        if self.proc.poll() is None:
            try:
                self.api("/api/shutdown", "POST")
            except (urllib.error.URLError, OSError):
                pass
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                _ignore_errors(os.killpg, self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()
        left = [p for p in self.seen.values() if _alive(p)]
        for cid in self.cluster_ids:
            left += [p for p in procs.find(cid, parts=None) if p.pid not in {q.pid for q in left}]
        named = [f"{p.pid} {_cmd(p)}" for p in left]
        procs.kill(left)
        return named


def _ignore_errors(fn, *args):
    try:
        fn(*args)
    except (OSError, psutil.Error):
        pass


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _cmd(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())[:160] or p.name()
    except psutil.Error:
        return "?"


def _lab_settings(d: Path):
    """User settings for this JupyterLab: every cell attached to the DOM (the screenshot and the checks see
    the whole notebook), and no news or update requests (no network)."""
    files = {
        "notebook-extension/tracker": {"windowingMode": "none"},
        "apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
    }
    for name, value in files.items():
        f = d / "@jupyterlab" / f"{name}.jupyterlab-settings"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(value))


def _git_status() -> list[str]:
    r = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO, capture_output=True,
                       text=True)
    return r.stdout.splitlines() if r.returncode == 0 else [f"git status failed: {r.stderr.strip()}"]


@contextmanager
def data_in_the_project(cifar_dir: str):
    """CIFAR-10 where the README tells a newcomer to put it, <project>/data/cifar-10-batches-py (a link to
    the test's copy unless the folder is there already; ignored by git either way)."""
    target = REPO / "data" / "cifar-10-batches-py"
    made = not target.exists()
    if made:
        target.parent.mkdir(exist_ok=True)
        target.symlink_to(Path(cifar_dir).resolve(), target_is_directory=True)
    try:
        yield target
    finally:
        if made:
            target.unlink()


@contextmanager
def jupyterlab(cifar_dir: str, tmp_path: Path):
    """JupyterLab in notebooks/ on the generated quickstart; on leaving, kernels and server shut down, the
    server log copied beside the screenshot, and no process of the notebook's engine pool left (else a failure)."""
    nb = REPO / "notebooks" / f"{NOTEBOOK}.ipynb"
    # as `make notebooks`: the .ipynb made from the tracked .py (kept, outputs and all, if it is there)
    subprocess.run([str(BIN / "jupytext"), "--sync", "--quiet", str(nb.with_suffix(".py"))], check=True)
    _lab_settings(tmp_path / "lab-settings")
    env = {k: v for k, v in os.environ.items() if k not in ("CIFAR10_DIR", "MPLBACKEND")}  # the kernel's inline backend
    env.update({"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "LABTOOLS_RESULTS": str(tmp_path / "results"),
                "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "lab-settings"),
                "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "lab-workspaces"),
                "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter-config"),
                "JUPYTER_RUNTIME_DIR": str(tmp_path / "jupyter-runtime"),
                "IPYTHONDIR": str(tmp_path / "ipython"), "TF_CPP_MIN_LOG_LEVEL": "2"})
    with data_in_the_project(cifar_dir):
        server = Lab(REPO / "notebooks", env, log_dir=tmp_path)
        try:
            server.wait_ready()
            yield server
        finally:
            killed = server.shutdown()
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(server.log_path, ARTIFACTS / "quickstart-jupyterlab.log")
            pool = [k for k in killed if any(part in k for part in ("ipengine", "ipcontroller", "ipyparallel"))]
            if pool:
                warnings.warn(f"ipyparallel processes outlived the kernel's shutdown and were killed: {pool}")
            left = [f"{p.pid} {_cmd(p)}" for cid in server.cluster_ids for p in procs.find(cid, parts=None)]
    # reached only when the test itself passed: a failure of its own is not hidden by this one
    assert not left, f"processes of the notebook's engine pool are still running after the test: {left}"


# ------------------------------------------------------------------ the test
def _cell(cells: list[dict], pattern: str) -> dict:
    """The first code cell whose source matches the regular expression (multi-line mode)."""
    found = [c for c in cells if re.search(pattern, c["source"], re.M)]
    assert found, f"no code cell matching {pattern!r}; sources: {[c['source'][:60] for c in cells]}"
    return found[0]


def _screenshot(page) -> None:
    """The whole notebook in one PNG: the viewport grown to the notebook's height, then a full-page shot."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        h = page.evaluate("""() => {
            const s = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-WindowedPanel-outer');
            const cells = s ? s.querySelectorAll('.jp-Cell') : [];
            if (!cells.length) return 0;
            s.scrollTop = 0;
            return cells[cells.length - 1].getBoundingClientRect().bottom - s.getBoundingClientRect().top + 40; }""")
        if h:
            page.set_viewport_size({"width": 1600, "height": min(int(h) + 260, 16000)})
            page.wait_for_timeout(1000)
    except Exception as e:  # the shot matters more than its size
        print(f"test_browser: could not size the screenshot: {e}", file=sys.stderr)
    page.screenshot(path=str(SCREENSHOT), full_page=True)


def test_quickstart_runs_in_jupyterlab(cifar_dir, tmp_path):
    chromium = _chromium()
    from playwright.sync_api import sync_playwright

    SCREENSHOT.unlink(missing_ok=True)
    source = REPO / "notebooks" / f"{NOTEBOOK}.py"
    status, text = _git_status(), source.read_bytes()
    with jupyterlab(cifar_dir, tmp_path) as lab, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                     args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            try:
                t_run, live, cells = _run_all(page, lab)
                print(f"run all cells: {time.monotonic() - t_run:.0f}s")
                _save(page, lab)
            finally:
                _screenshot(page)
                print(f"screenshot: {SCREENSHOT}")
        finally:
            browser.close()

    # saved: the outputs are in the generated .ipynb; the tracked .py and git status are as they were
    saved = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    assert any(c.get("outputs") for c in saved.cells if c.cell_type == "code"), "the save kept no outputs"
    assert source.read_bytes() == text, f"saving in JupyterLab changed {source.name}"
    assert _git_status() == status, f"running and saving the quickstart changed git status: {_git_status()}"

    # no traceback, every code cell ran
    errors = [s for c in cells for s in c["stderr"] if "Traceback" in s]
    assert not errors, "a cell failed:\n" + "\n".join(e[-3000:] for e in errors)
    assert all(re.search(r"\[\d+\]", c["prompt"]) for c in cells), [c["prompt"] for c in cells]

    # per-engine output: the %%px cell's print on both ranks, the training's log lines from both engines
    px = _cell(cells, r"\A\s*%%px")  # the cell magic, not a comment naming it
    for r in (0, 1):
        assert f"[stdout:{r}]" in px["text"] and f"MPI rank {r} of 2" in px["text"], px["text"]
    train = _cell(cells, TRAINING)
    for r in (0, 1):
        assert f"[stdout:{r}]" in train["text"] and f"[Rank {r}]" in train["text"], train["text"][-2000:]
    # ...streamed live: shown while the training cell was still running
    assert live, "no engine output appeared in the training cell while it ran (only at its end, or never)"

    # the tqdm.auto progress bar rendered as a widget: an HBox of HTML, FloatProgress, HTML; ipywidgets 8 renders
    # the FloatProgress as .widget-hprogress > .progress > .progress-bar (ipywidgets 7: .widget-progress)
    assert train["progress"], ("no progress bar widget in the training cell's output (a tqdm.auto bar renders "
                               f".widget-hprogress .progress-bar); bars elsewhere: {[c['progress'] for c in cells]}")
    assert train["progress"][-1] == "100%", f"the training bar ended at {train['progress'][-1]!r}, not 100%"
    assert not [c for c in cells if "Error displaying widget" in c["text"]], "a widget failed to display"

    # the figure inline: a loaded image (study.publish shows the saved PNG)
    images = [im for c in cells for im in c["images"]]
    assert any(im["complete"] and im["width"] > 100 and im["height"] > 100 for im in images), images
    assert (REPO / "figures" / "quick" / "figures" / "quickstart_rank_log.png").is_file()  # ignored by git


def _save(page, lab: Lab) -> None:
    """Ctrl+S in the notebook, as a user saves; wait until the server has the new file (its mtime moves)."""
    before = lab.api(f"/api/contents/{NOTEBOOK}.ipynb?content=0")["last_modified"]
    page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook").first.click()
    page.keyboard.press("Control+s")
    t0 = time.monotonic()
    while lab.api(f"/api/contents/{NOTEBOOK}.ipynb?content=0")["last_modified"] == before:
        assert time.monotonic() - t0 < 60, f"the notebook was not saved within 60 s:\n{lab.log_tail()}"
        time.sleep(0.5)
    page.wait_for_timeout(1000)  # the paired .py is written in the same request; let the UI settle


def _run_all(page, lab: Lab):
    """Open the notebook, Run > Run All Cells, wait until the kernel is idle with every code cell run (an
    execution count in its prompt; the last cell, pool.stop(), shows nothing) or one failed.
    Returns (start time, whether engine output showed in the running training cell, cells)."""
    page.goto(lab.url(f"{NOTEBOOK}.ipynb"), wait_until="domcontentloaded", timeout=START_TIMEOUT * 1000)
    page.wait_for_selector(".jp-NotebookPanel .jp-Notebook .jp-CodeCell", timeout=START_TIMEOUT * 1000)
    t0 = time.monotonic()
    while not [k for k in lab.kernels() if k.get("execution_state") == "idle"]:
        assert time.monotonic() - t0 < START_TIMEOUT, f"the kernel did not start:\n{lab.log_tail()}"
        time.sleep(0.5)
    lab.track()
    page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook").first.click()
    page.locator(".lm-MenuBar-item", has_text=re.compile(r"^\s*Run\s*$")).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()

    t_run, live, last = time.monotonic(), False, None
    while time.monotonic() - t_run < RUN_TIMEOUT:
        time.sleep(1)
        lab.track()
        cells = page.evaluate(CELLS_JS)
        last = cells
        running = any("*" in c["prompt"] for c in cells)
        train = [c for c in cells if re.search(TRAINING, c["source"], re.M)]
        if train and "*" in train[0]["prompt"] and "[stdout:" in train[0]["text"]:
            live = True
        failed = any("Traceback" in s for c in cells for s in c["stderr"])
        all_ran = cells and all(re.search(r"\[\d+\]", c["prompt"]) for c in cells)
        idle = all(k.get("execution_state") == "idle" for k in lab.kernels())
        if idle and not running and (failed or all_ran):
            page.wait_for_timeout(1000)  # the last display updates
            return t_run, live, page.evaluate(CELLS_JS)
    summary = [(c["prompt"], c["source"][:40], c["text"][-300:]) for c in last or []]
    pytest.fail(f"the notebook did not finish within {RUN_TIMEOUT}s; cells: {summary}\n"
                f"JupyterLab log:\n{lab.log_tail()}")
