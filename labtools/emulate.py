"""Emulated multi-host MPI on one Linux machine: network namespaces as hosts (root only).

    from labtools.emulate import Hosts
    with Hosts(3, rate="1gbit") as h:                      # lt-h0..lt-h2 on bridge ltbr0
        cmd = ["mpiexec", *h.mpiexec_args(ppn=2), "-n", "6", "python", "-m", "labtools.cli", "train", ...]
        subprocess.run(cmd, env={**os.environ, **h.env()})
        h.veth_bytes()                                       # {"lt-h0": rx+tx bytes, ...}

Each host is a network namespace ``lt-hI`` joined by a veth pair (``lt-hI-v`` in the root
namespace, ``eth0`` inside) to the bridge ``ltbr0``; the bridge has ``SUBNET.1``, host I has
``SUBNET.(11+I)``. ``rate`` puts a tbf qdisc on both ends of every veth (traffic into and out of
each host). Hosts share the machine's cores, memory and file system: times measured here are not
cluster times.

MPI (the mpich wheel's Hydra, ch4:ucx) sees separate hosts only if (1) every MPI process runs in
its host's namespace under its own host name, and (2) MPI uses no local transport; otherwise data
moves through shared memory and never crosses a veth. (1): Hydra's ssh launcher is replaced by
``wrapper`` (``WRAPPER [ssh options] HOST COMMAND...``), which runs COMMAND in the host's network
namespace with a private UTS namespace named after the host; ``-localhost BRIDGE_IP`` makes the
proxies connect back to mpiexec through the bridge. (2): ``env()`` sets ``MPIR_CVAR_NOLOCAL=1``
and ``UCX_TLS=tcp``. Every argument is an IP address; ``ip netns exec`` also bind-mounts a
per-namespace hosts file (/etc/netns/lt-hI/hosts, removed on close) for code that resolves the
host names. ``hide={I: [paths]}`` mounts an empty read-only tmpfs over those paths for host I's
processes only (a private mount namespace), e.g. a data folder "missing on one host".

``close()`` (also on a failed setup; idempotent) kills every process left in the namespaces and
removes namespaces, veths, bridge, hosts files and the wrapper. Leftovers of a crashed session
(namespaces ``lt-h<digits>``, their veths, the bridge) are removed before creating; a lock file
keeps two live ``Hosts`` from destroying each other's namespaces.
"""
from __future__ import annotations

import fcntl
import ipaddress
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

LOCK = "/run/lock/labtools-emulate.lock"
ENV_MARK = "LABTOOLS_EMULATED_HOSTS"


class HostsError(RuntimeError):
    """Emulated hosts cannot be set up here (not root, a tool missing, a command failed)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and r.returncode:
        raise HostsError(f"`ip {' '.join(args)}` failed: {r.stderr.strip()}")
    return r


def _tc(*args: str, netns: str | None = None) -> None:
    cmd = ["tc", *(["-n", netns] if netns else []), *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise HostsError(f"`{' '.join(cmd)}` failed: {r.stderr.strip()}")


def netns_list() -> list[str]:
    """Names of the network namespaces `ip netns` knows."""
    return [line.split()[0] for line in _ip("netns", "list", check=False).stdout.splitlines() if line.strip()]


def netns_pids(name: str) -> list[int]:
    """Live (not zombie) processes whose network namespace is `name` (`ip netns pids`)."""
    return [int(p) for p in _ip("netns", "pids", name, check=False).stdout.split() if p.isdigit() and _alive(p)]


def _alive(pid: str) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class Hosts:
    """n network-namespace hosts on one bridge, optionally rate-limited; a context manager.

    Attributes: ``names`` (["lt-h0", ...]), ``ips``, ``bridge_ip``, ``veths`` (root-side veth per
    host), ``wrapper`` (path of the ssh-like launcher script), ``rate``.
    """

    def __init__(self, n: int = 3, rate: str | None = "1gbit", subnet: str = "10.213.7.0/24",
                 hide: dict[int, list] | None = None, prefix: str = "lt-h", bridge: str = "ltbr0",
                 burst: str = "256kb", latency: str = "50ms", lock_wait: float = 30.0):
        if n < 1:
            raise ValueError("Hosts needs n >= 1")
        if not re.fullmatch(r"[a-z][a-z0-9-]{0,6}", prefix) or len(bridge) > 15:
            raise ValueError("prefix: up to 7 of [a-z0-9-] (interface names are 15 characters at most)")
        _preflight()
        net = ipaddress.ip_network(subnet)
        if net.num_addresses < n + 12:
            raise ValueError(f"subnet {subnet} is too small for {n} hosts")
        self.n, self.rate, self.prefix, self.bridge = n, rate, prefix, bridge
        self.names = [f"{prefix}{i}" for i in range(n)]
        self.veths = [f"{name}-v" for name in self.names]
        self.bridge_ip = str(net.network_address + 1)
        self.ips = [str(net.network_address + 11 + i) for i in range(n)]
        self._plen = net.prefixlen
        self._net = net
        self.hide = {int(k): [str(Path(p).resolve()) for p in v] for k, v in (hide or {}).items()}
        self._shape = ("burst", burst, "latency", latency)
        self._closed = False
        self._lockf = None
        self.tmp = None
        self.wrapper = None
        self._lock(lock_wait)
        try:
            self._cleanup_leftovers()
            self._check_subnet()
            self._setup()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ setup
    def _lock(self, wait: float) -> None:
        os.makedirs(os.path.dirname(LOCK), exist_ok=True)
        self._lockf = open(LOCK, "a+")
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(self._lockf, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    self._lockf.seek(0)
                    who = self._lockf.read().strip() or "?"
                    self._lockf.close()
                    self._lockf = None
                    raise HostsError(f"another emulated cluster is live (lock {LOCK} held by pid {who}); "
                                     f"wait for it to close") from None
                time.sleep(0.5)
        self._lockf.seek(0)
        self._lockf.truncate()
        self._lockf.write(str(os.getpid()))
        self._lockf.flush()

    def _ours(self, name: str) -> bool:
        return re.fullmatch(re.escape(self.prefix) + r"\d+", name) is not None

    def _cleanup_leftovers(self) -> None:
        """A crashed session's namespaces, veths, bridge and hosts files with our names."""
        for ns in netns_list():
            if self._ours(ns):
                _kill_all(ns)
                _ip("netns", "del", ns, check=False)
        for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
            m = re.match(r"\d+:\s+([^:@\s]+)", line)
            if m and (m.group(1) == self.bridge or
                      re.fullmatch(re.escape(self.prefix) + r"\d+-[ve]", m.group(1))):
                _ip("link", "del", m.group(1), check=False)
        if os.path.isdir("/etc/netns"):
            for d in os.listdir("/etc/netns"):
                if self._ours(d):
                    shutil.rmtree(os.path.join("/etc/netns", d), ignore_errors=True)

    def _check_subnet(self) -> None:
        for line in _ip("-o", "-4", "addr", "show", check=False).stdout.splitlines():
            f = line.split()
            addr = ipaddress.ip_interface(f[3])
            if addr.network.overlaps(self._net):
                raise HostsError(f"subnet {self._net} is already in use here ({f[1]} {f[3]}); pass another subnet=")

    def _setup(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="labtools-emulate-")
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.bridge_ip}/{self._plen}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        hosts_file = "127.0.0.1 localhost\n::1 localhost\n" + \
            "".join(f"{ip} {name}\n" for ip, name in zip(self.ips, self.names)) + f"{self.bridge_ip} {self.bridge}\n"
        for name, veth, ip in zip(self.names, self.veths, self.ips):
            _ip("netns", "add", name)
            os.makedirs(f"/etc/netns/{name}", exist_ok=True)
            Path(f"/etc/netns/{name}/hosts").write_text(hosts_file)
            peer = f"{name}-e"
            _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
            _ip("link", "set", peer, "netns", name)
            _ip("-n", name, "link", "set", peer, "name", "eth0")
            _ip("link", "set", veth, "master", self.bridge)
            _ip("link", "set", veth, "up")
            _ip("-n", name, "addr", "add", f"{ip}/{self._plen}", "dev", "eth0")
            _ip("-n", name, "link", "set", "eth0", "up")
            _ip("-n", name, "link", "set", "lo", "up")
            if self.rate:
                tbf = ("qdisc", "add", "dev", "{}", "root", "tbf", "rate", self.rate, *self._shape)
                _tc(*[a.format(veth) for a in tbf])                        # into the host
                _tc(*[a.format("eth0") for a in tbf], netns=name)          # out of the host
        self.wrapper = os.path.join(self.tmp, "ssh-netns")
        Path(self.wrapper).write_text(self._wrapper_script())
        os.chmod(self.wrapper, 0o755)
        self._wait_links()

    def _wait_links(self, timeout: float = 10.0) -> None:
        """Return once every link is up and forwarding: a launch right after setup must not race it."""
        def ready(veth: str) -> bool:
            try:
                state = Path(f"/sys/class/net/{veth}/operstate").read_text().strip()
                port = Path(f"/sys/class/net/{veth}/brport/state").read_text().strip()
            except OSError:
                return False
            return state == "up" and port == "3"  # BR_STATE_FORWARDING

        deadline = time.monotonic() + timeout
        while not all(ready(v) for v in self.veths):
            if time.monotonic() > deadline:
                raise HostsError(f"links {self.veths} not up and forwarding after {timeout:g}s")
            time.sleep(0.05)

    def _wrapper_script(self) -> str:
        cases = []
        for i, (name, ip) in enumerate(zip(self.names, self.ips)):
            pre = f"hostname {name}" + "".join(f" && mount -t tmpfs -o ro,size=4k {self.prefix}-hidden {shlex.quote(p)}"
                                                for p in self.hide.get(i, []))
            cases.append(f"  {ip}|{name}) ns={name}; pre={shlex.quote(pre)} ;;")
        return f"""#!/bin/sh
# labtools.emulate launcher, called by Hydra like ssh: $0 [ssh options] HOST COMMAND...
# Runs COMMAND (joined and run by sh, as ssh does) in HOST's network namespace under HOST's name.
while [ $# -gt 0 ]; do
  case "$1" in
    -[bcDEeFIiJLlmOopQRSWw]) shift 2 ;;
    -*) shift ;;
    *) break ;;
  esac
done
host=$1; shift
case "$host" in
{chr(10).join(cases)}
  *) echo "labtools.emulate: unknown host $host" >&2; exit 255 ;;
esac
exec ip netns exec "$ns" unshare --uts --mount sh -c "$pre && exec sh -c \\"\\$0\\"" "$*"
"""

    # ------------------------------------------------------------ use
    def mpiexec_args(self, ppn: int = 1, hosts=None, n: int | None = None) -> list[str]:
        """Hydra arguments placing ``ppn`` processes on each host (all, or ``hosts``: indices or
        names), launched through ``wrapper``; with ``n`` also ``-n n``."""
        idx = range(self.n) if hosts is None else [h if isinstance(h, int) else self.names.index(h) for h in hosts]
        args = ["-hosts", ",".join(f"{self.ips[i]}:{ppn}" for i in idx), "-launcher", "ssh",
                "-launcher-exec", self.wrapper, "-localhost", self.bridge_ip]
        return args + (["-n", str(n)] if n is not None else [])

    def env(self) -> dict[str, str]:
        """Environment for mpiexec: no local (shared-memory) transport, TCP only, and the mark
        ``LABTOOLS_EMULATED_HOSTS="hosts=lt-h0,lt-h1,...;machine=NAME;rate=RATE"`` for run records."""
        return {"MPIR_CVAR_NOLOCAL": "1", "UCX_TLS": "tcp", "UCX_NET_DEVICES": "eth0",
                "UCX_WARN_UNUSED_ENV_VARS": "n",
                ENV_MARK: f"hosts={','.join(self.names)};machine={socket.gethostname()};rate={self.rate or 'unshaped'}"}

    def veth_bytes(self) -> dict[str, int]:
        """{host: rx + tx bytes so far on its veth} (counted on the bridge side)."""
        out = {}
        for name, veth in zip(self.names, self.veths):
            st = Path("/sys/class/net", veth, "statistics")
            out[name] = int((st / "rx_bytes").read_text()) + int((st / "tx_bytes").read_text())
        return out

    def pids(self, host) -> list[int]:
        """Processes running in host's namespace (index or name)."""
        return netns_pids(self.names[host] if isinstance(host, int) else host)

    # ------------------------------------------------------------ teardown
    def close(self) -> None:
        """Kill what runs in the namespaces; remove namespaces, veths, bridge, files. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._lockf is not None:  # without the lock these names may be another session's
                for ns in netns_list():
                    if ns in self.names:
                        _kill_all(ns)
                        _ip("netns", "del", ns, check=False)
                for link in (*self.veths, self.bridge):
                    if os.path.exists(f"/sys/class/net/{link}"):
                        _ip("link", "del", link, check=False)
                for name in self.names:
                    shutil.rmtree(f"/etc/netns/{name}", ignore_errors=True)
            if self.tmp:
                shutil.rmtree(self.tmp, ignore_errors=True)
        finally:
            if self._lockf is not None:
                self._lockf.close()  # releases the flock
                self._lockf = None

    def __enter__(self) -> "Hosts":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Hosts({', '.join(f'{n}={ip}' for n, ip in zip(self.names, self.ips))}, rate={self.rate})"


def _kill_all(ns: str, timeout: float = 10.0) -> None:
    """SIGKILL every process in namespace ns until none is left (or timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        pids = [p for p in netns_pids(ns) if p != os.getpid()]
        if not pids or time.monotonic() > deadline:
            return
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def _preflight() -> None:
    if not hasattr(os, "geteuid") or os.uname().sysname != "Linux":
        raise HostsError("emulated hosts need Linux network namespaces")
    if os.geteuid() != 0:
        raise HostsError("emulated hosts need root (network namespaces, veths, tc); run as root")
    missing = [t for t in ("ip", "tc", "unshare", "mount", "hostname") if shutil.which(t) is None]
    if missing:
        raise HostsError(f"emulated hosts need {', '.join(missing)} on PATH (iproute2, util-linux, hostname)")


__all__ = ["Hosts", "HostsError", "netns_list", "netns_pids", "ENV_MARK"]
