"""The cluster path for real: MPI across emulated hosts (network namespaces on one machine, 1 Gbit/s links).

Needs root (namespaces, veths, tc): in CI a missing root is a failure, elsewhere a skip.
The hosts share this machine's cores and file system; what is checked is that traffic crosses the
links, that results do not depend on the host layout, and that a host without the data fails fast.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import BIN, REPO, mpiexec, run_mpi

from labtools import records
from labtools.emulate import Hosts, HostsError, netns_list

pytestmark = [pytest.mark.hosts, pytest.mark.mpi]

MiB = 2**20
OURS = re.compile(r"lt-h\d+")
TRAIN = ["--np", "6", "--epochs", "2", "--limit-train", "480", "--limit-test", "100", "--quiet", "--threads", "1"]


def _ns_inodes(names) -> set[int]:
    return {os.stat(f"/run/netns/{n}").st_ino for n in names if os.path.exists(f"/run/netns/{n}")}


def _procs_in(inodes: set[int]) -> list[int]:
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if os.stat(f"/proc/{p}/ns/net").st_ino in inodes:
                    out.append(int(p))
            except OSError:
                pass
    return out


def _assert_nothing_left(h: Hosts, inodes: set[int]) -> None:
    assert not [n for n in netns_list() if OURS.fullmatch(n)], netns_list()
    links = os.listdir("/sys/class/net")
    assert "ltbr0" not in links and not [x for x in links if re.fullmatch(r"lt-h\d+-[ve]", x)], links
    assert not [d for d in (os.listdir("/etc/netns") if os.path.isdir("/etc/netns") else []) if OURS.fullmatch(d)]
    assert not (h.tmp and os.path.exists(h.tmp))
    assert not _procs_in(inodes), "processes left in the emulated hosts' namespaces"


@pytest.fixture(scope="module")
def hidden(tmp_path_factory) -> Path:
    """A folder hidden (an empty tmpfs over it) from host lt-h2's processes only."""
    return tmp_path_factory.mktemp("cifar-copy").resolve()


@pytest.fixture(scope="module")
def cluster(hidden):
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("CI must run the emulated-cluster tests as root (network namespaces, veths, tc)")
        pytest.skip("emulated hosts need root")
    h = Hosts(3, rate="1gbit", hide={2: [hidden]})
    inodes = _ns_inodes(h.names)
    yield h
    h.close()
    _assert_nothing_left(h, inodes)


def launch(h: Hosts, ppn: int, n: int, argv: list[str], hosts=None, timeout: float = 300):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **h.env()}
    cmd = [mpiexec(), *h.mpiexec_args(ppn, hosts=hosts, n=n), *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def _delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in after}


# Rank 0 prints every rank's line: two processes printing at once interleave in Hydra's output.
ALLREDUCE = ("import socket, numpy as np; from mpi4py import MPI; c = MPI.COMM_WORLD; "
             "a = np.full(20 * 2**20 // 8, c.rank + 1.0); b = np.empty_like(a); c.Allreduce(a, b); "
             "rows = c.gather(f'{c.rank} {socket.gethostname()} {b.min()} {b.max()}'); "
             "c.rank == 0 and print('\\n'.join(rows), flush=True)")


def test_allreduce_crosses_the_link(cluster):
    """20 MiB Allreduce between lt-h0 and lt-h1: at least 20 MiB through each of their veths."""
    before = cluster.veth_bytes()
    r = launch(cluster, 1, 2, [sys.executable, "-c", ALLREDUCE], hosts=[0, 1], timeout=120)
    moved = _delta(before, cluster.veth_bytes())
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(x for x in r.stdout.splitlines() if x[:1].isdigit()) == ["0 lt-h0 3.0 3.0", "1 lt-h1 3.0 3.0"], r.stdout
    assert moved["lt-h0"] >= 20 * MiB and moved["lt-h1"] >= 20 * MiB, moved
    assert moved["lt-h2"] < MiB, moved  # not part of the job
    print(f"veth bytes moved: {moved}")


def _summary(out: Path, experiment: str) -> tuple[dict, dict]:
    dirs = [p.parent for p in (out / experiment).glob("*/summary.json")]
    assert len(dirs) == 1, dirs
    return tuple(json.loads((dirs[0] / f).read_text()) for f in ("summary.json", "manifest.json"))


@pytest.mark.slow
def test_same_weights_on_any_host_layout(cluster, cifar_dir, tmp_path):
    """N=6 on 3 hosts x 2 processes, on 3 hosts x 1 process (logical ranks), and on one host with
    P=2: the same final weights; the records name the 3 hosts; the weights crossed the links."""
    args = ["-m", "labtools.cli", "train", *TRAIN, "--cifar-dir", cifar_dir, "--out", str(tmp_path)]
    ref = run_mpi(2, ["train", *TRAIN, "--cifar-dir", cifar_dir, "--out", str(tmp_path), "--experiment", "one"])
    assert ref.returncode == 0, ref.stderr[-3000:]
    want, m1 = _summary(tmp_path, "one")
    assert len(set(want["final_weight_digests"].values())) == 1 and len(want["final_weight_digests"]) == 6
    for exp, ppn in (("p6", 2), ("p3", 1)):
        before = cluster.veth_bytes()
        t0 = time.perf_counter()
        r = launch(cluster, ppn, 3 * ppn, [sys.executable, *args, "--experiment", exp])
        wall, moved = time.perf_counter() - t0, _delta(before, cluster.veth_bytes())
        assert r.returncode == 0, r.stderr[-3000:]
        s, m = _summary(tmp_path, exp)
        assert s["final_weight_digests"] == want["final_weight_digests"], (exp, s["final_weight_digests"], want)
        assert (m["world"], m["processes"]) == (6, 3 * ppn)
        assert Counter(m["hosts"]) == {name: ppn for name in cluster.names}, m["hosts"]
        assert not s["cluster_wall_time"] and m["wall_time_kind"] == records.EMULATED  # the hosts share 2 cores
        assert m["emulated_hosts"] and all(name in m["emulated_hosts"] for name in cluster.names)
        # every non-root host sent its weights to the root and got the average back, each epoch
        assert all(moved[name] > 2 * MiB for name in cluster.names), moved
        print(f"{exp}: {wall:.1f}s, veth bytes {moved}, wall_time_kind={m['wall_time_kind']!r}")


def test_host_without_the_data_fails_fast(cluster, cifar_dir, hidden, tmp_path):
    """The data exists (a folder of links to it) everywhere except on lt-h2: one line naming lt-h2, no hang."""
    for f in Path(cifar_dir).iterdir():
        (hidden / f.name).symlink_to(f.resolve())
    t0 = time.perf_counter()
    r = launch(cluster, 1, 3, [sys.executable, "-m", "labtools.cli", "train", "--np", "3", "--epochs", "1",
                               "--limit-train", "48", "--limit-test", "10", "--quiet", "--threads", "1",
                               "--cifar-dir", str(hidden), "--out", str(tmp_path)], timeout=120)
    took = time.perf_counter() - t0
    assert r.returncode != 0 and took < 60, (r.returncode, took, r.stderr[-2000:])
    lines = [x for x in r.stderr.splitlines() if "missing on host" in x]
    assert lines == [f"labtools: error: CIFAR-10 folder {hidden} (verified on the root) is missing on host lt-h2; "
                     f"every node needs it at the same path."], r.stderr[-3000:]
    print(f"failed in {took:.1f}s with exit code {r.returncode}")


def test_close_leaves_nothing_and_cleans_leftovers(cluster):
    """close() kills and removes everything (also after a failed setup); a crash's leftovers are removed."""
    inodes = _ns_inodes(cluster.names)
    sleeper = subprocess.Popen(["ip", "netns", "exec", cluster.names[1], "sleep", "600"])
    try:
        deadline = time.monotonic() + 10
        while not cluster.pids(1) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cluster.pids(1)
        cluster.close()
        cluster.close()  # idempotent
        assert sleeper.wait(timeout=10) != 0
        _assert_nothing_left(cluster, inodes)
    finally:
        sleeper.kill()
    # a crashed session's leftovers: a namespace with a process in it, a bridge, a veth
    for cmd in (["netns", "add", "lt-h7"], ["link", "add", "ltbr0", "type", "bridge"],
                ["link", "add", "lt-h7-v", "type", "veth", "peer", "name", "lt-h7-e"]):
        subprocess.run(["ip", *cmd], check=True)
    crashed = _ns_inodes(["lt-h7"])
    orphan = subprocess.Popen(["ip", "netns", "exec", "lt-h7", "sleep", "600"])
    try:
        time.sleep(0.3)
        with Hosts(3, rate=None) as h:
            assert sorted(n for n in netns_list() if OURS.fullmatch(n)) == h.names
            assert orphan.wait(timeout=10) != 0
            inodes = _ns_inodes(h.names) | crashed
        _assert_nothing_left(h, inodes)
    finally:
        orphan.kill()
    # a setup that fails halfway (a bad rate: tc fails after the namespaces exist) leaves nothing
    with pytest.raises(HostsError, match="tc"):
        Hosts(3, rate="fast")
    _assert_nothing_left(h, set())
