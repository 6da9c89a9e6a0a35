"""The fault matrix: each case injects one fault and asserts the exact outcome."""
from __future__ import annotations

import http.server
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import json
import multiprocessing as mp

import numpy as np
import pandas as pd
import psutil
import pytest

from conftest import BIN, REPO, mpiexec

from labtools import data as D
from labtools import record, records, results
from labtools.config import RunConfig



def _matrix(case: str, **facts) -> None:
    """With LABTOOLS_FAULT_MATRIX=FILE, append this case's outcome (rc, time to end, record state):
    the closing note's table comes from a real run of this suite, not from memory."""
    path = os.environ.get("LABTOOLS_FAULT_MATRIX")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"case": case, **facts}, default=str) + "\n")


# ---- data

class _Payload:
    """Unpickling this runs open(marker, 'w'): the marker file proves code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _evil_pickle(marker: Path) -> bytes:
    return pickle.dumps({b"data": _Payload(marker), b"labels": [0]}, protocol=4)


def _copy_with_real(tmp_path: Path, cifar_dir: str, own: str) -> Path:
    """A CIFAR folder in tmp_path: `own` copied (so the test may alter it), the rest symlinked."""
    d = tmp_path / D.FOLDER
    d.mkdir()
    for f in D.MD5:
        if f == own:
            (d / f).write_bytes((Path(cifar_dir) / f).read_bytes())
        else:
            (d / f).symlink_to(Path(cifar_dir) / f)
    return d


def _no_leftovers(dest: Path) -> bool:
    return not list(Path(dest).glob(".cifar-*"))


def test_same_size_same_mtime_pickle_payload_is_refused_and_never_runs(cifar_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    d = _copy_with_real(tmp_path, cifar_dir, "data_batch_1")
    f, marker = d / "data_batch_1", tmp_path / "PWNED"
    D.verify(d)  # the old code remembered this pass by size and mtime
    st = f.stat()
    evil = _evil_pickle(marker)
    f.write_bytes(evil + b"\0" * (st.st_size - len(evil)))  # pickle ignores bytes after STOP
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    with pytest.raises(D.DataError, match=r"data_batch_1 has md5 [0-9a-f]{32}, expected c99caf.*official one"):
        D.verify(d)
    with pytest.raises(D.DataError, match=r"data_batch_1 has md5 .*truncated or altered"):
        D.load_cifar10(d)
    assert not marker.exists()
    assert not (tmp_path / "cache" / "labtools" / "verified.json").exists()  # no pass is remembered
    _matrix("data_batch_1 replaced by a pickle payload, same size and mtime", rc="DataError (md5)",
            state="payload never ran")


def test_restricted_unpickler_refuses_payload_without_md5(tmp_path):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "my_batch"  # not one of the seven names: no md5 to check, only the unpickler
    evil.write_bytes(_evil_pickle(marker))
    with pytest.raises(D.DataError, match=r"my_batch asks to load .*open, which no CIFAR-10 batch does"):
        D._load_batch(evil)
    with pytest.raises(D.DataError, match=r"not unpickled .*official one"):
        D._restricted_loads(_evil_pickle(marker), evil)
    assert not marker.exists()
    _matrix("pickle payload under a name with no md5", rc="DataError (forbidden global)", state="payload never ran")


def test_byte_flip_with_size_and_mtime_kept_is_caught(cifar_dir, tmp_path):
    d = _copy_with_real(tmp_path, cifar_dir, "data_batch_1")
    f = d / "data_batch_1"
    st = f.stat()
    with open(f, "r+b") as h:  # one pixel byte in the middle: the old loader read it silently
        h.seek(st.st_size // 2)
        b = h.read(1)
        h.seek(st.st_size // 2)
        h.write(bytes([b[0] ^ 0x01]))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(D.DataError, match=r"data_batch_1 has md5 .*, expected c99cafc152244af753f735de768cd75f"):
        D.verify(d)
    with pytest.raises(D.DataError, match=r"data_batch_1 has md5 .*, expected c99cafc152244af753f735de768cd75f"):
        D.load_cifar10(d, test=False)


@pytest.fixture
def trickle_url():
    """A local server that sends headers promising 170 MB, then one byte a second."""
    stop = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(170_000_000))
            self.end_headers()
            try:
                while not stop.is_set():
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    stop.wait(1.0)
            except OSError:
                pass  # the client hung up

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/cifar-10-python.tar.gz"
    stop.set()
    srv.shutdown()
    srv.server_close()


def test_stalled_download_stops_at_its_deadline(trickle_url, tmp_path, monkeypatch):
    monkeypatch.setenv("LABTOOLS_CIFAR_URL", trickle_url)
    t0 = time.monotonic()
    with pytest.raises(D.DataError) as e:
        D.download_cifar10(tmp_path, deadline=3)
    took = time.monotonic() - t0
    assert 3 <= took < 5, took
    msg = str(e.value)
    assert "passed its 3 s deadline" in msg and "bytes received" in msg and "CIFAR10_DIR" in msg
    assert _no_leftovers(tmp_path) and not (tmp_path / D.FOLDER).exists()
    _matrix("download stalls (1 byte/s), deadline 3 s", rc="DataError", seconds=round(took, 2), state="no partial files")


def test_sigterm_during_download_leaves_nothing(trickle_url, tmp_path):
    code = f"from labtools import data; data.download_cifar10({str(tmp_path)!r}, deadline=60, url={trickle_url!r})"
    p = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        # Wait until the archive is being written (the handler is installed before the temp folder),
        # then give it the ~1.5 s of a download in progress.
        t0 = time.monotonic()
        while not list(tmp_path.glob(".cifar-*/cifar-10-python.tar.gz")):
            assert p.poll() is None and time.monotonic() - t0 < 15, "download never started"
            time.sleep(0.05)
        time.sleep(1.5)
        t1 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=5)
    finally:
        p.kill()
    took = time.monotonic() - t1
    assert p.returncode == 143 and took < 3
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    assert _no_leftovers(tmp_path)
    _matrix("SIGTERM during download", rc=p.returncode, seconds=round(took, 2), state="no partial files")


def test_offline_error_lists_every_folder_and_the_way_out(tmp_path, monkeypatch):
    from labtools import paths

    home, env_dir, cwd, project = (tmp_path / n for n in ("home", "env", "cwd", "project"))
    for p in (home, env_dir, cwd, project):
        p.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("CIFAR10_DIR", str(env_dir))
    monkeypatch.setattr(paths, "checkout", lambda: project)
    monkeypatch.chdir(cwd)
    with socket.socket() as s:  # a port nobody listens on: connection refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("LABTOOLS_CIFAR_URL", f"http://127.0.0.1:{port}/cifar-10-python.tar.gz")
    with pytest.raises(D.DataError) as e:
        D.find_cifar_dir(download=True)
    msg = str(e.value)
    # the project's data/ (never the current folder's), where the download went and left nothing
    dirs = [str(env_dir), str(project / "data" / D.FOLDER), str(home / ".keras" / "datasets" / D.FOLDER)]
    assert [str(d.absolute()) for d in D.candidate_dirs()] == dirs
    assert all(d in msg for d in dirs), msg
    assert f"127.0.0.1:{port}" in msg and "failed after 0 bytes" in msg
    assert "set CIFAR10_DIR or pass --cifar-dir" in msg and msg.count(". ") == 0
    assert _no_leftovers(project / "data") and not (cwd / "data").exists()


def test_real_batches_load_as_before(cifar_dir):
    with open(Path(cifar_dir) / "data_batch_1", "rb") as f:  # plain pickle: fine for the official file
        ref = pickle.load(f, encoding="bytes")
    x, y = D._load_batch(Path(cifar_dir) / "data_batch_1")
    assert x.shape == (10_000, 32, 32, 3) and x.dtype == np.uint8 and x.flags.c_contiguous
    assert y.shape == (10_000,) and y.dtype == np.int64
    assert np.array_equal(x, ref[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    assert list(y) == ref[b"labels"] and list(y[:10]) == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    xtr, ytr, xte, yte = D.load_cifar10(cifar_dir)
    assert xtr.shape == (50_000, 32, 32, 3) and xte.shape == (10_000, 32, 32, 3) and xtr.dtype == np.uint8
    assert ytr.dtype == yte.dtype == np.int64 and list(yte[:10]) == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert np.array_equal(xtr[:10_000], x)


# ---- runs: kill, signals, stuck peers, resume, full disks, concurrent records, bad input

# N = 4 logical ranks on P = 2 processes, 4 short epochs on real CIFAR-10
RUN = ["--np", "4", "--epochs", "4", "--limit-train", "960", "--limit-test", "100", "--quiet"]


def _env():
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "TF_CPP_MIN_LOG_LEVEL": "2"}


def _launch(n, args, **kw):
    cmd = ([mpiexec(), "-n", str(n)] if n else []) + [sys.executable, "-m", "labtools.cli", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO, **kw)


def _one_run(out: Path, experiment: str) -> Path:
    dirs = [p.parent for p in (out / experiment).glob("*/manifest.json")]
    assert len(dirs) == 1, dirs
    return dirs[0]


def _manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


def _wait_epochs(out: Path, experiment: str, n: int, proc, timeout=240) -> Path:
    t = time.time()
    while time.time() - t < timeout:
        assert proc.poll() is None, proc.communicate()
        dirs = list((out / experiment).glob("*/manifest.json"))
        if dirs and _manifest(dirs[0].parent).get("epochs_done", 0) >= n:
            return dirs[0].parent
        time.sleep(0.05)
    raise AssertionError(f"no {n} epochs within {timeout}s")


def _worker(mpiexec_proc, rank: int) -> psutil.Process:
    """The training process of MPI rank `rank` (the keeper's child) under this mpiexec."""
    for p in psutil.Process(mpiexec_proc.pid).children(recursive=True):
        try:
            env = p.environ()
        except psutil.Error:
            continue
        if env.get("LABTOOLS_WORKER") == "1" and env.get("PMI_RANK") == str(rank):
            return p
    raise AssertionError("rank process not found")


def _ended(proc, timeout=60) -> tuple[int, str, str, float]:
    t = time.time()
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err, time.time() - t


def _lines(err: str) -> list[str]:
    """stderr without TensorFlow's and MPI's own start-up chatter."""
    return [l for l in err.splitlines() if l.strip() and not l.startswith(("WARNING: All log", "I0000", "W0000", "E0000"))]


@pytest.fixture(scope="module")
def uninterrupted(cifar_dir, tmp_path_factory):
    """The reference: the same run, never interrupted."""
    out = tmp_path_factory.mktemp("ref")
    p = _launch(2, ["train", *RUN, "--cifar-dir", cifar_dir, "--out", str(out), "--experiment", "a"])
    rc, _, err, _ = _ended(p, 300)
    assert rc == 0, err[-2000:]
    d = _one_run(out, "a")
    assert _manifest(d)["status"] == "completed" and not (d / "checkpoint.npz").exists()
    return json.loads((d / "summary.json").read_text())


def test_kill9_of_a_rank_is_named_marked_failed_and_resume_gives_the_same_weights(cifar_dir, tmp_path, uninterrupted):
    p = _launch(2, ["train", *RUN, "--cifar-dir", cifar_dir, "--out", str(tmp_path), "--experiment", "b"])
    d = _wait_epochs(tmp_path, "b", 2, p)
    time.sleep(0.3)  # inside epoch 3
    victim = _worker(p, 1)
    victim.kill()
    rc, _, err, took = _ended(p)
    # Hydra reports 137 (the keeper's 128+9) or 9 (the other processes it killed), whichever it sees first
    assert rc in (9, 137) and took < 15, (rc, took, err[-2000:])  # 0.3-0.4 s on a quiet machine
    assert f"process 1 (host {os.uname().nodename}, pid {victim.pid}) was killed by SIGKILL" in err
    m = _manifest(d)
    assert m["status"] == "failed" and "process 1" in m["error"] and "SIGKILL" in m["error"]
    assert record.status(d) == "failed" and (d / "checkpoint.npz").exists() and m["epochs_done"] == 2
    _matrix("kill -9 of rank 1 in epoch 3 (N=4, P=2)", rc=rc, seconds=round(took, 2), state=f"failed: {m['error']}")
    assert not list(results.run_dirs(tmp_path, "b"))  # readers never take it for completed
    assert results.load_runs(tmp_path, "b", include_incomplete=True).status.tolist() == ["failed"]
    listed = subprocess.run([sys.executable, "-m", "labtools.cli", "runs", "--results", str(tmp_path)],
                            capture_output=True, text=True, env=_env())
    assert "failed" in listed.stdout and d.name in listed.stdout

    r = _launch(2, ["train", "--resume", str(d)])
    rc, out, err, _ = _ended(r, 300)
    assert rc == 0, err[-2000:]
    s = json.loads((d / "summary.json").read_text())
    assert s["final_weight_digests"] == uninterrupted["final_weight_digests"]
    assert s["test_acc"] == uninterrupted["test_acc"] and s["mean_train_loss"] == uninterrupted["mean_train_loss"]
    m = _manifest(d)
    assert m["status"] == "completed" and m["resumed"][0]["from_epoch"] == 2 and "error" not in m
    assert m["wall_time_kind"] == records.RESUMED and not m["cluster_wall_time"]
    assert len(pd.read_csv(d / "epochs.csv")) == 4 and len(pd.read_csv(d / "ranks" / "rank_003.csv")) == 4
    assert not (d / "checkpoint.npz").exists() and not (d / "error.txt").exists()
    _matrix("resume after kill -9 (P=2)", rc=0, state="completed; final digests = uninterrupted run's",
            digests=s["final_weight_digests"]["0"])


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_interrupts_every_process_in_one_line_and_resume_on_another_P(cifar_dir, tmp_path, uninterrupted, sig, code):
    p = _launch(2, ["train", *RUN, "--cifar-dir", cifar_dir, "--out", str(tmp_path), "--experiment", "s"])
    d = _wait_epochs(tmp_path, "s", 1, p)
    p.send_signal(sig)  # to mpiexec, as a scheduler or Ctrl-C would; it forwards to every process
    rc, _, err, took = _ended(p)
    lines = _lines(err)
    assert rc == code and took < 30, (rc, took, err[-2000:])
    assert "Traceback" not in err and len([l for l in lines if l.startswith("labtools:")]) == 1, err
    m = _manifest(d)
    assert m["status"] == "interrupted" and signal.Signals(sig).name in m["error"], m
    assert (d / "checkpoint.npz").exists() and m["epochs_done"] >= 1
    # continue with one process hosting all four logical ranks: the same numbers
    r = _launch(1, ["train", "--resume", str(d)])
    rc, _, err, _ = _ended(r, 300)
    assert rc == 0, err[-2000:]
    s = json.loads((d / "summary.json").read_text())
    assert s["final_weight_digests"] == uninterrupted["final_weight_digests"] and s["processes"] == 1
    _matrix(f"{signal.Signals(sig).name} to mpiexec in epoch 2", rc=code, seconds=round(took, 2),
            state=f"interrupted after {m['epochs_done']} epoch(s); resumed on P=1: digests = uninterrupted run's")


def test_a_peer_that_stops_answering_ends_the_job_within_the_wait_limit(cifar_dir, tmp_path):
    p = _launch(2, ["train", *RUN, "--epochs", "2", "--cifar-dir", cifar_dir, "--out", str(tmp_path),
                    "--experiment", "h", "--inject-failure", "2:0:hang", "--wait-limit", "5"])
    t = time.time()
    rc, _, err, _ = _ended(p, 120)
    named = f"process 1 (host {os.uname().nodename}, pid"  # the one hanging, not the one waiting
    assert rc != 0 and "process 0" in err and "waited over 5s" in err and named in err and \
        "did not arrive: busy" in err, err[-2000:]
    d = _one_run(tmp_path, "h")
    m = _manifest(d)
    took = time.time() - t
    assert m["status"] == "failed" and "waited over 5s" in m["error"] and named in m["error"] and took < 60
    assert [(c["rank"], c["kind"]) for c in m["not_arrived"]] == [(1, "busy")]
    _matrix("a peer stops answering (--wait-limit 5)", rc=rc, seconds=round(took, 2), state=f"failed: {m['error']}")


def test_resume_refuses_what_it_cannot_continue(cifar_dir, tmp_path):
    p = _launch(0, ["train", "--limit-train", "48", "--limit-test", "20", "--epochs", "1", "--quiet",
                    "--cifar-dir", cifar_dir, "--out", str(tmp_path), "--experiment", "c"])
    assert _ended(p, 120)[0] == 0
    d = _one_run(tmp_path, "c")
    for args, says in ([["--resume", str(d)], "already completed"],
                       [["--resume", str(tmp_path)], "no manifest.json"],
                       [["--resume", str(d), "--lr", "0.1"], "drop --lr"]):
        r = _launch(0, ["train", *args])
        rc, _, err, _ = _ended(r)
        assert rc == 2 and says in err and len(_lines(err)) == 1, err
    before = _manifest(d)
    r = _launch(0, ["train", "--resume", str(d)])
    assert _ended(r)[0] == 2 and _manifest(d) == before  # a refused resume writes nothing


# ---- full disk: a run that could not write everything is never `completed`

def _mount_tmpfs(path: Path, opts: str):
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("the full-disk cases mount a small tmpfs: CI must run as root")
        pytest.skip("needs root to mount a small tmpfs")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], check=True)


def _umount(path: Path):
    subprocess.run(["umount", str(path)], check=False)


@pytest.mark.parametrize("limit", ["size", "nr_inodes"])
def test_a_full_disk_never_yields_a_completed_record(cifar_dir, tmp_path, limit):
    """Sweep the space (4 KiB pages) or the files (inodes) a small tmpfs allows, from too little for
    anything up to enough for the whole run: every run either completes with every file readable,
    or fails with nothing that says `completed`. Some failures must come after training ended, in
    the final writes, or the sweep did not test the end."""
    from labtools.train import run

    cfg = RunConfig(limit_train=48, limit_test=20, epochs=1, quiet=True, diagnostics=False, threads=1,
                    cifar_dir=cifar_dir, experiment="full", checkpoint=False)
    late_failures, completed_at = 0, None
    for k in range(1, 40):
        mnt = tmp_path / f"{limit}{k}"
        _mount_tmpfs(mnt, f"{limit}={k * 4096 if limit == 'size' else k}")
        try:
            try:
                s = run(cfg.replace(out=str(mnt)))
            except Exception as e:  # noqa: BLE001 - the outcome is checked below
                s, err = None, e
            dirs = [p.parent for p in (mnt / "full").glob("*/manifest.json")] if (mnt / "full").is_dir() else []
            if s is not None:
                d = Path(s["run_dir"])
                assert _manifest(d)["status"] == "completed" and json.loads((d / "summary.json").read_text())
                assert results.run_dirs(mnt, "full") == [d]
                sc = mnt / "full" / "scaling_results.csv"
                if not sc.exists():
                    continue  # complete; its derived table row could not be written yet (rebuilt by the next run)
                assert pd.read_csv(sc).run_id.tolist() == [d.name]
                completed_at = k
                break
            assert "No space left" in str(err) or "Errno 28" in str(err) or isinstance(err, OSError), err
            for d in dirs:
                assert _manifest(d).get("status") != "completed" and record.status(d) != "completed"
                assert not results.run_dirs(mnt, "full")
                if (d / "epochs.csv").exists():
                    late_failures += 1
            sc = mnt / "full" / "scaling_results.csv"
            assert not sc.exists() or sc.stat().st_size == 0 or len(pd.read_csv(sc)) == 0  # no row for it
        finally:
            _umount(mnt)
    assert completed_at is not None and late_failures >= 1, (completed_at, late_failures)
    _matrix(f"full disk: tmpfs {limit} swept 1..{completed_at}", rc="OSError (ENOSPC)",
            state=f"{completed_at - 1} runs failed, {late_failures} of them after training ended; none completed")


# ---- records written by several processes at once

def _complete_many(exp, tag, n):
    for i in range(n):
        rec = record.RunRecord.create(exp.parent, exp.name, None, f"{tag}-{i}")
        rec.manifest = {"world": 2, "status": "running", "config": {"cifar_dir": "$CIFAR10_DIR"}}
        rec.complete({"world": 2, "epochs": 1, "batch_per_node": 24, "batch_per_rank": 12, "mean_train_loss": 2.3,
                      "mean_train_acc": 0.1, "global_wall_s": 1.0, "test_acc": 0.1, "test_loss": 2.3,
                      "processes": 2, "sync": "allreduce", "seed": tag})


def test_concurrent_runs_never_lose_each_others_scaling_rows(tmp_path):
    exp = tmp_path / "e"
    ps = [mp.get_context("spawn").Process(target=_complete_many, args=(exp, t, 300)) for t in (1, 2)]
    for p in ps:
        p.start()
    for p in ps:
        p.join(300)
    assert [p.exitcode for p in ps] == [0, 0]
    df = pd.read_csv(exp / "scaling_results.csv")
    assert len(df) == 600 and sorted(df.run_id) == sorted(f"{t}-{i}" for t in (1, 2) for i in range(300))
    assert list(df.columns) == results.SCALING_COLUMNS
    _matrix("2 x 300 runs completing at once", rc=0, state=f"{len(df)} rows in scaling_results.csv")


def test_run_folders_are_created_exclusively(tmp_path):
    a = record.RunRecord.create(tmp_path, "e", None, "same-id")
    b = record.RunRecord.create(tmp_path, "e", None, "same-id")
    assert a.dir != b.dir and b.dir.name == "same-id-2"
    with pytest.raises(record.RecordError, match="already exists"):
        record.RunRecord.create(tmp_path, "e", "same-id", "x")


def test_a_late_writer_never_reopens_a_finished_record(tmp_path):
    rec = record.RunRecord.create(tmp_path, "e", "r", "r")
    rec.start({"world": 2, "config": {"epochs": 1}})
    rec.stop_heartbeat()
    other = record.RunRecord(rec.dir)  # e.g. the keeper of a killed process
    other.mark(record.FAILED, "process 1 (host h, pid 1) was killed by SIGKILL")
    assert rec.write_manifest(record.RUNNING, epochs_done=1) is False
    assert _manifest(rec.dir)["status"] == "failed" and "SIGKILL" in _manifest(rec.dir)["error"]


def test_a_running_record_whose_processes_are_gone_reads_died(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    rec = record.RunRecord.create(tmp_path, "e", "r", "r")
    rec.start({"world": 1, "config": {"epochs": 2}, "pids": [[os.uname().nodename, gone.pid]]})
    rec.stop_heartbeat()
    assert record.status(rec.dir) == "died"
    rows = record.listing(tmp_path)
    assert rows[0]["status"] == "died"


# ---- bad input: one line, exit 2, before any work, nothing written

@pytest.mark.parametrize("args, says", [
    (["--run-id", "../../x"], "--run-id must be a plain folder name"),
    (["--run-id", "a/b"], "--run-id must be a plain folder name"),
    (["--experiment", ".."], "--experiment must be a plain folder name"),
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--lr", "0"], "--lr must be positive"),
    (["--eval-batch", "0"], "--eval-batch must be at least 1"),
    (["--momentum", "1.5"], "--momentum must be in [0, 1)"),
    (["--threads", "-1"], "--threads must not be negative; got -1."),
    (["--seed", "-1"], "--seed must not be negative; got -1."),
    (["--epochs", "0"], "--epochs must be at least 1"),
])
def test_bad_flags_get_one_line_exit_2_and_nothing_written(tmp_path, args, says):
    p = _launch(0, ["train", "--out", str(tmp_path / "out"), *args])
    rc, out, err, took = _ended(p)
    assert rc == 2 and _lines(err) == [l for l in _lines(err) if says in l] and len(_lines(err)) == 1, err
    assert not (tmp_path / "out").exists() and took < 30
    _matrix(" ".join(args), rc=rc, seconds=round(took, 2), state="nothing written", says=_lines(err)[0])


def test_an_out_that_cannot_be_written_is_found_before_any_work(tmp_path, cifar_dir):
    f = tmp_path / "afile"
    f.write_text("x")
    p = _launch(2, ["train", "--out", str(f), "--cifar-dir", cifar_dir])
    rc, _, err, took = _ended(p)
    assert rc == 2 and len(_lines(err)) == 1 and "is a file, not a folder" in err and took < 30, err
    ro = tmp_path / "ro"
    _mount_tmpfs(ro, "size=64k,ro")
    try:
        p = _launch(0, ["train", "--out", str(ro), "--cifar-dir", cifar_dir])
        rc, _, err, _ = _ended(p)
        assert rc == 2 and len(_lines(err)) == 1 and "is not writable" in err, err
    finally:
        _umount(ro)


def test_an_unknown_sync_is_one_line_once(tmp_path):
    p = _launch(2, ["train", "--sync", "bogus"])
    rc, _, err, _ = _ended(p)
    assert rc == 2 and len(_lines(err)) == 1 and err.count("invalid choice: 'bogus'") == 1, err
    assert "labtools train --help" in err, err


def test_reproduce_continues_a_stopped_run_instead_of_starting_again(tmp_path, cifar_dir):
    from labtools import experiments, numerics

    cfg = RunConfig(np=2, epochs=2, out=str(tmp_path), experiment="e")
    rec = record.RunRecord.create(tmp_path, "e", None, "stopped")
    rec.start({"config": cfg.to_dict(), "world": 2, "processes": 2, "science_key": cfg.science_key(),
               "numerics_version": numerics.VERSION, "numerics_sources": numerics.SOURCES_SHA})
    rec.mark(record.INTERRUPTED, "interrupted by SIGTERM")
    (rec.dir / "checkpoint.npz").write_bytes(b"x")
    calls = []

    def runner(c, p, resume=None):
        calls.append(resume)
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        experiments.ensure([experiments.Planned(cfg, 2)], runner)
    assert calls == [rec.dir]
    calls.clear()  # a timed plan needs a cluster time, which a resumed run never is: it starts again
    with pytest.raises(RuntimeError):
        experiments.ensure([experiments.Planned(cfg, 2, timed=True)], runner)
    assert calls == [None]


# ---- issue 28: every fault names its cause and leaves nothing behind

def _job(proc) -> tuple[list[psutil.Process], set[str]]:
    """The processes under a running mpiexec and the MPI shared-memory segments they map (other
    sessions on this machine have their own: only this job's are checked)."""
    procs = psutil.Process(proc.pid).children(recursive=True)
    segs = set()
    for p in procs:
        try:
            segs |= {p for p in (x.path for x in p.memory_maps()) if p.startswith("/dev/shm/")}
        except psutil.Error:
            pass
    return procs, segs


# many short epochs: a peer that stops is waited for after at most one short epoch's work
SHORT = ["--np", "4", "--epochs", "30", "--limit-train", "240", "--limit-test", "40", "--quiet"]


def _wait_progress(proc, out: Path, experiment: str, P: int) -> Path:
    """The run folder, once every process writes its progress file (training is under way)."""
    d = _wait_epochs(out, experiment, 0, proc)
    t = time.time()
    while not all((d / ".progress" / f"p{r:04d}").exists() for r in range(P)):
        assert proc.poll() is None and time.time() - t < 120, "no progress files"
        time.sleep(0.05)
    time.sleep(1.0)  # into the first epoch's steps
    return d


def _alive(procs) -> list[str]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {p.status()} {' '.join(p.cmdline())[:80]}")
        except psutil.Error:
            pass
    return out


# A parent that never reaps (a container without an init, a supervisor): it adopts the job's orphans
# (PR_SET_CHILD_SUBREAPER) and keeps them as zombies for as long as it lives.
NON_REAPING_PARENT = """
import ctypes, subprocess, sys, time
ctypes.CDLL(None).prctl(36, 1)
p = subprocess.Popen(sys.argv[1:])
print(p.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.mpi
def test_a_job_killed_whole_under_a_parent_that_does_not_reap_is_died_and_resumed_at_once(cifar_dir, tmp_path):
    cmd = [mpiexec(), "-n", "2", sys.executable, "-m", "labtools.cli", "train", *RUN, "--cifar-dir", cifar_dir,
           "--out", str(tmp_path), "--experiment", "z"]
    parent = subprocess.Popen([sys.executable, "-c", NON_REAPING_PARENT, *cmd], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, env=_env(), cwd=REPO)
    try:
        job = int(parent.stdout.readline())
        d = _wait_epochs(tmp_path, "z", 0, parent)  # the record is written: the job is training
        procs, segs = _job(psutil.Process(job))
        mpich = {p for p in segs if p.startswith("/dev/shm/mpich_")}  # UCX removes its own
        assert mpich and {p for _, p in _manifest(d)["shm"]} == mpich, (segs, _manifest(d).get("shm"))
        for p in [psutil.Process(job), *procs]:
            p.kill()  # every process of the job at once: the OOM killer, a node reboot
        t0 = time.time()
        while _alive(procs):
            time.sleep(0.05)
        zombies = [p for p in psutil.Process(parent.pid).children() if p.status() == psutil.STATUS_ZOMBIE]
        assert len(zombies) >= 2, zombies  # the workers (the keepers' children) linger as zombies
        assert _manifest(d)["status"] == "running" and record.status(d) == "died"
        record.RunRecord.open(d)  # the resume is accepted (it was refused until the 180 s heartbeat limit)
        accepted = time.time() - t0
        assert accepted < 5, accepted
        listed = subprocess.run([sys.executable, "-m", "labtools.cli", "runs", "--results", str(tmp_path)],
                                capture_output=True, text=True, env=_env())
        assert "died" in listed.stdout, listed.stdout
        assert all(os.path.exists(p) for p in mpich)  # MPI_Finalize never ran: the segments are still there
        # the real command is accepted too (it gets as far as TensorFlow, blocked here: the
        # whole resume is what test_kill9_... runs) and removes the dead job's segments first
        r = subprocess.run([sys.executable, "-m", "labtools.cli", "train", "--resume", str(d)], capture_output=True,
                           text=True, env={**_env(), **_no_tf(tmp_path)}, cwd=REPO, timeout=60)
        assert "tensorflow imported before the cheap checks" in r.stderr and "still running" not in r.stderr, r.stderr
    finally:
        parent.kill()
        parent.wait()
    assert not [p for p in segs if os.path.exists(p)], segs
    _matrix("kill -9 of every process (P=2) under a non-reaping parent, then --resume", rc="accepted",
            seconds=round(accepted, 2), state="`died` at once; the resume is accepted and removes the job's segments")


@pytest.mark.mpi
@pytest.mark.parametrize("P, stopped", [(2, 1), (4, 2)])
def test_a_stopped_peer_is_named_within_the_wait_limit_and_nothing_is_left(cifar_dir, tmp_path, P, stopped):
    limit = 6
    p = _launch(P, ["train", *SHORT, "--cifar-dir", cifar_dir, "--out", str(tmp_path), "--experiment", "st",
                    "--wait-limit", str(limit)])
    d = _wait_progress(p, tmp_path, "st", P)
    victim = _worker(p, stopped)
    procs, segs = _job(p)
    assert segs
    victim.suspend()  # SIGSTOP: alive, silent
    t0 = time.time()
    try:
        rc, _, err, _ = _ended(p, 120)
        took = time.time() - t0
        while _alive(procs) and time.time() - t0 < limit + 10:
            time.sleep(0.2)
        left = _alive(procs)  # the stopped process included: nothing of the job may stay
    finally:
        for q in procs:
            try:
                q.kill()
            except psutil.Error:
                pass
    host = os.uname().nodename
    named = f"process {stopped} (host {host}, pid {victim.pid}) did not arrive: no sign of life"
    assert rc != 0 and took < limit + 10, (rc, took, err[-2000:])
    lines = [l for l in _lines(err) if l.startswith("labtools:")]
    assert lines and all(named in l for l in lines) and "Traceback" not in err, err[-3000:]
    m = _manifest(d)
    assert m["status"] == "failed" and named in m["error"], m
    assert [c["rank"] for c in m["not_arrived"]] == [stopped] and m["not_arrived"][0]["kind"] == "not responding"
    assert not left, left
    assert not [s for s in segs if os.path.exists(s)], segs
    _matrix(f"SIGSTOP of process {stopped} (P={P}, --wait-limit {limit})", rc=rc, seconds=round(took, 2),
            state=f"failed: {m['error']}", leftovers="none")


@pytest.mark.hosts
@pytest.mark.mpi
def test_a_cut_off_host_is_named_unreachable_and_leaves_no_process(cifar_dir, tmp_path):
    from labtools.emulate import Hosts, HostsError, netns_pids

    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("CI must run the emulated-host tests as root")
        pytest.skip("emulated hosts need root")
    limit = 6
    try:
        h = Hosts(2, rate="1gbit")
    except HostsError as e:
        pytest.fail(str(e))
    try:
        cmd = [mpiexec(), *h.mpiexec_args(1, n=2), sys.executable, "-m", "labtools.cli", "train", *SHORT,
               "--threads", "1", "--cifar-dir", cifar_dir, "--out", str(tmp_path), "--experiment", "cut",
               "--wait-limit", str(limit)]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                             env={**_env(), **h.env()})
        d = _wait_progress(p, tmp_path, "cut", 2)
        subprocess.run(["ip", "link", "set", h.veths[1], "down"], check=True)  # lt-h1 is gone from the network
        t0 = time.time()
        rc, _, err, _ = _ended(p, 120)
        ended = time.time() - t0
        while any(h.pids(n) for n in h.names) and time.time() - t0 < limit + 10:
            time.sleep(0.2)
        cleared = time.time() - t0
        left = {n: [" ".join(psutil.Process(q).cmdline())[:60] for q in h.pids(n)] for n in h.names}
    finally:
        h.close()
    assert not any(left.values()) and cleared < limit + 10, (cleared, left)
    assert rc != 0 and ended < limit + 10, (rc, ended, err[-2000:])
    says = "process 1 (host lt-h1, pid"
    assert any(says in l and "is unreachable: host lt-h1 does not answer from lt-h0" in l
               for l in _lines(err)), err[-3000:]
    m = _manifest(d)
    assert m["status"] == "failed" and "host lt-h1 does not answer" in m["error"], m
    assert [(c["host"], c["kind"]) for c in m["not_arrived"]] == [("lt-h1", "unreachable")], m["not_arrived"]
    _matrix(f"link of host lt-h1 cut (2 emulated hosts, --wait-limit {limit})", rc=rc, seconds=round(ended, 2),
            state=f"failed: {m['error']}", leftovers=f"none after {cleared:.1f}s")


# a TensorFlow that cannot be imported: what must be decided before it is, is
NO_TF = "raise ImportError('tensorflow imported before the cheap checks')\n"


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run that failed in its 2nd epoch, with the checkpoint after epoch 1, written by RunRecord as
    training writes it (the states are small stand-ins: what is checked is the file, not its numbers)."""
    from labtools import numerics

    out = tmp_path_factory.mktemp("stopped")
    cfg = RunConfig(np=2, epochs=2, limit_train=96, limit_test=20, quiet=True, out=str(out), experiment="c",
                    run_id="base")
    rec = record.RunRecord.create(out, "c", "base", "base")
    rec.start({"config": cfg.to_dict(), "world": 2, "processes": 1, "science_key": cfg.science_key(),
               "numerics_version": numerics.VERSION, "numerics_sources": numerics.sources_sha(), "threads": 1})
    rec.add_epoch({"epoch": 1}, [{"rank": 0, "epoch": 1}, {"rank": 1, "epoch": 1}])
    w = np.random.default_rng(0).standard_normal(20_000).astype(np.float32)
    rec.save_checkpoint({0: [w, w * 0], 1: [w, w * 0 + 1]}, {"epochs_done": 1, "wall_s": 1.0, "init_diag": {}})
    rec.mark(record.FAILED, "InjectedFailure: injected failure on rank 0 in epoch 1")
    d = out / "c" / "base"
    assert _manifest(d)["checkpoint"]["epochs_done"] == 1
    return d


def _no_tf(tmp_path) -> dict:
    (tmp_path / "notf").mkdir(exist_ok=True)
    (tmp_path / "notf" / "tensorflow.py").write_text(NO_TF)
    return {"PYTHONPATH": str(tmp_path / "notf")}


def _damage(ck: Path, how: str) -> None:
    data = ck.read_bytes()
    if how == "truncated":
        ck.write_bytes(data[:len(data) // 2])
    elif how == "flipped":
        i = len(data) // 2
        ck.write_bytes(data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:])
    elif how == "emptied":
        ck.write_bytes(b"")
    else:
        ck.unlink()


@pytest.mark.parametrize("how, says", [("truncated", "BadZipFile"), ("flipped", "Bad CRC-32"),
                                       ("emptied", "the file is empty"), ("deleted", None), ("intact", None)])
def test_a_damaged_checkpoint_is_one_sentence_before_tensorflow(stopped_run, tmp_path, how, says):
    d = tmp_path / "c" / how
    import shutil

    shutil.copytree(stopped_run, d)
    if how != "intact":
        _damage(d / "checkpoint.npz", how)
    p = subprocess.Popen([sys.executable, "-m", "labtools.cli", "train", "--resume", str(d)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**_env(), **_no_tf(tmp_path)}, cwd=REPO)
    rc, _, err, took = _ended(p)
    lines = _lines(err)
    if says:
        assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert f"{d / 'checkpoint.npz'} is damaged (" in lines[0] and says in lines[0], lines
        assert "start it again from epoch 1" in lines[0], lines
        assert f"delete that file and run `labtools train --resume {d}`" in lines[0]
        assert _manifest(d)["status"] == "failed"  # a refused resume writes nothing
        _matrix(f"checkpoint {how}, --resume", rc=rc, seconds=round(took, 2), state="failed (unchanged)",
                says=lines[0])
    else:  # accepted: it gets as far as TensorFlow (blocked here), and a restart from epoch 1 says so
        assert "tensorflow imported before the cheap checks" in err, err
        restart = "has no checkpoint, so the run starts again from epoch 1 (the 1 epoch(s) recorded are trained again)"
        assert (restart in err) == (how == "deleted"), err


def test_the_checkpoint_checksum_is_kept_and_checked(tmp_path):
    rec = record.RunRecord.create(tmp_path, "e", "r", "r")
    rec.manifest = {"world": 1}
    rec.save_checkpoint({0: [np.arange(4.0, dtype=np.float32)]}, {"epochs_done": 1})
    assert _manifest(rec.dir)["checkpoint"]["epochs_done"] == 1
    again = record.RunRecord(rec.dir)
    again.manifest = _manifest(rec.dir)
    meta, states = again.load_checkpoint()
    assert meta["epochs_done"] == 1 and states[0][0].tolist() == [0, 1, 2, 3]
    # a whole file that is not the one recorded (same epoch): damaged; a newer one (its checksum's write lost): fine
    other = record.RunRecord(tmp_path / "e" / "r")
    other.manifest = {}
    other.save_checkpoint({0: [np.ones(4, np.float32)]}, {"epochs_done": 1})
    again.manifest = {**_manifest(rec.dir), "checkpoint": {**again.manifest["checkpoint"], "sha256": "0" * 64}}
    with pytest.raises(record.RecordError, match="checksum differs from the one recorded after epoch 1"):
        again.load_checkpoint()
    again.manifest["checkpoint"]["epochs_done"] = 0
    assert again.load_checkpoint()[0]["epochs_done"] == 1


def test_cheap_checks_come_before_tensorflow(stopped_run, tmp_path):
    env = {**_env(), **_no_tf(tmp_path)}
    for args, says in ([["--run-id", "base", "--out", str(stopped_run.parent.parent), "--experiment", "c"],
                        f"run folder {stopped_run} already exists"],
                       [["--resume", str(stopped_run), "--lr", "0.1"], "drop --lr"],
                       [["--seed", "-1"], "--seed must not be negative; got -1."],
                       [["--wait-limit", "-3"], "--wait-limit must not be negative; got -3.0."],
                       [["--sync-every", "-2"], "--sync-every must not be negative; got -2."],
                       [["--force"], "--force goes with --resume RUN_DIR"]):
        p = subprocess.Popen([sys.executable, "-m", "labtools.cli", "train", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
        rc, _, err, took = _ended(p)
        assert rc == 2 and len(_lines(err)) == 1 and says in err, (args, err)
        _matrix("train " + " ".join(a for a in args if not a.startswith("/")), rc=rc, seconds=round(took, 2),
                state="nothing written, TensorFlow never imported", says=_lines(err)[0])


def test_resume_on_another_host_says_how_long_and_the_way_out(tmp_path):
    rec = record.RunRecord.create(tmp_path, "e", "r", "r")
    rec.start({"world": 2, "config": {"epochs": 2}, "pids": [["elsewhere", 1], ["elsewhere", 2]]})
    rec.stop_heartbeat()
    assert record.status(rec.dir) == "running"
    with pytest.raises(record.RecordError) as e:
        record.RunRecord.open(rec.dir)
    msg = str(e.value)
    assert "may still be running on elsewhere" in msg and "counts as died when the heartbeat is 180s old, in" in msg
    assert f"`labtools train --resume {rec.dir} --force`" in msg
    assert record.RunRecord.open(rec.dir, force=True).dir == rec.dir
    # here, a live process is never overridden
    mine = record.RunRecord.create(tmp_path, "e", "m", "m")
    mine.start({"world": 1, "config": {"epochs": 2}, "pids": [[os.uname().nodename, os.getpid()]]})
    mine.stop_heartbeat()
    with pytest.raises(record.RecordError, match=f"still running here \\(pid {os.getpid()} "):
        record.RunRecord.open(mine.dir, force=True)


@pytest.mark.notebook
def test_a_truncated_manifest_is_named_and_skipped_and_reproduction_goes_on(tmp_path):
    import shutil
    import warnings

    store = tmp_path / "store"
    shutil.copytree(REPO / "results", store, ignore=shutil.ignore_patterns("local"))
    victim = sorted((store / "scaling-quick").glob("*/manifest.json"))[0]
    n = len(results.load_runs(store, "scaling-quick"))
    assert n > 1
    victim.write_text(victim.read_text()[:300])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        df = results.load_runs(store, "scaling-quick", include_incomplete=True)
        done = results.load_runs(store, "scaling-quick")
    assert len(done) == n - 1 and victim.parent.name not in set(df.run_id)
    assert any(str(victim) in str(x.message) and "is left out" in str(x.message) for x in w), [str(x.message) for x in w]
    listed = subprocess.run([sys.executable, "-m", "labtools.cli", "runs", "--results", str(store), "--all",
                             "--experiment", "scaling-quick"], capture_output=True, text=True, env=_env())
    row = [line.split() for line in listed.stdout.splitlines() if line.startswith(victim.parent.name)]
    assert row and row[0][-1] == "unreadable", listed.stdout + listed.stderr
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "labtools.cli", "reproduce", "--profile", "quick", "--stored-only",
                        "--notebook", "02_strong_scaling", "--results", str(store), "--out", str(tmp_path / "fig")],
                       capture_output=True, text=True, env=_env(), cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    _matrix("a completed run's manifest cut to 300 bytes; reproduce --stored-only", rc=r.returncode,
            seconds=round(time.time() - t0, 2), state=f"{n - 1} of {n} runs read; the cut one named in a warning")


def test_runs_says_when_the_checkpoint_holds_fewer_epochs_than_recorded(tmp_path):
    from labtools.listing import run_rows

    rec = record.RunRecord.create(tmp_path, "e", "r", "r")
    rec.start({"world": 1, "processes": 1, "config": {"epochs": 3}})
    rec.stop_heartbeat()
    rec.add_epoch({"epoch": 1}, [])
    rec.save_checkpoint({0: [np.zeros(2, np.float32)]}, {"epochs_done": 1})
    rec.add_epoch({"epoch": 2}, [])  # the checkpoint after epoch 2 was never written (a full disk)
    rec.mark(record.FAILED, "OSError: [Errno 28] No space left on device")
    assert run_rows(tmp_path)[0]["epochs"] == "2/3 (ckpt 1)"
