"""A real one-node Slurm cluster on this machine, for CI and for trying batch scripts before a cluster.

    from labtools.slurm_local import LocalSlurm

    with LocalSlurm() as slurm:                       # ~1 s to an idle node (2-core VM, munged included)
        env = {**os.environ, **slurm.env()}           # SLURM_CONF of this cluster, for every client
        subprocess.run(["sbatch", "--wait", "examples/slurm/train.sbatch"], env=env, check=True)

It installs nothing: slurmctld, slurmd, the clients and munge come from the system
(`apt-get install slurmctld slurmd slurm-client munge`). It needs root (slurmd runs jobs as their
user; SlurmUser=root). What it does, in order:

- a Slurm that already answers (slurmctld running and `sinfo` works with this environment) is used
  as it is: nothing is written, nothing is stopped on exit;
- munge: a key is created if /etc/munge/munge.key is missing (owner munge, mode 0600) and munged is
  started (as user munge) if `munge -n` does not work; a munged it started is stopped on exit unless
  another slurmctld or slurmd still runs on this machine (it may be using it);
- a minimal slurm.conf goes into a temp folder (never /etc/slurm, so a real configuration is never
  touched) with free ports; `slurmctld -D -f CONF` and `slurmd -D -f CONF` run as children of this
  process; clients find the cluster through SLURM_CONF (`env()`);
- it waits until `sinfo` shows the node idle (SlurmUnavailable with the daemons' log tails if not).

`close()` cancels this cluster's jobs, stops only the daemons it started and removes its temp folder.
No TensorFlow import here (the module is usable from any Python).
"""
from __future__ import annotations

import atexit
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

INSTALL = "apt-get install slurmctld slurmd slurm-client munge"
REQUIRED = ("slurmctld", "slurmd", "sbatch", "sinfo", "squeue", "scancel", "munge", "munged")
MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_SOCKET_DIR = Path("/run/munge")
_SEARCH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/local/sbin"])


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be used or started here; the message says why and what to do."""


def which(name: str) -> str | None:
    """`name` on PATH or in the sbin folders (not on a normal user's PATH)."""
    return shutil.which(name, path=_SEARCH)


def missing_tools() -> list[str]:
    return [t for t in REQUIRED if not which(t)]


def _tail(path: Path, n: int = 25) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"  ({path}: not written)"
    return "\n".join(f"  {line}" for line in lines[-n:]) or f"  ({path}: empty)"


def _running(comm: str) -> bool:
    """A process named `comm` runs on this machine (any user)."""
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if Path("/proc", pid, "comm").read_text().strip() == comm:
                    return True
            except OSError:
                continue
    return False


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _mem_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 1024


def _stop(proc: subprocess.Popen | None, grace: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class LocalSlurm:
    """Context manager: a one-node Slurm cluster (or the one already running here)."""

    def __init__(self, timeout: float = 60.0, cluster: str = "labtools", kill_wait: int = 30):
        self.timeout = timeout
        self.cluster = cluster
        self.kill_wait = kill_wait  # seconds between SIGTERM and SIGKILL when a job is cancelled
        self.host = socket.gethostname().split(".")[0]
        self.dir: Path | None = None
        self.conf: Path | None = None
        self.reused = False
        self.startup_s: float | None = None  # time from start() to an idle node
        self._ctld: subprocess.Popen | None = None
        self._slurmd: subprocess.Popen | None = None
        self._munged_pid: int | None = None
        self._closed = False

    # ------------------------------------------------------------------ public
    def __enter__(self) -> "LocalSlurm":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def env(self) -> dict[str, str]:
        """What a client (sbatch, squeue, srun inside jobs) needs to talk to this cluster."""
        if self.conf is not None:
            return {"SLURM_CONF": str(self.conf)}
        return {"SLURM_CONF": os.environ["SLURM_CONF"]} if os.environ.get("SLURM_CONF") else {}

    def start(self) -> "LocalSlurm":
        t0 = time.monotonic()
        missing = missing_tools()
        if missing:
            raise SlurmUnavailable(f"Slurm is not installed here ({', '.join(missing)} not found); "
                                   f"as root: `apt-get update && {INSTALL}`.")
        if _running("slurmctld") and self._sinfo_ok(dict(os.environ)):
            self.reused = True  # someone's real cluster: use it, change nothing
            self.startup_s = time.monotonic() - t0
            return self
        if os.geteuid() != 0:
            raise SlurmUnavailable("starting a local Slurm cluster needs root (slurmd runs the jobs, "
                                   "munged needs its key in /etc/munge); run as root or use a running cluster.")
        atexit.register(self.close)
        try:
            self._start_munge()
            self.dir = Path(tempfile.mkdtemp(prefix="labtools-slurm-"))
            self.conf = self._write_conf()
            env = {**os.environ, **self.env()}
            self._ctld = self._daemon("slurmctld", env)
            self._slurmd = self._daemon("slurmd", env)
            self._wait_idle(env)
        except BaseException:
            self.close()
            raise
        self.startup_s = time.monotonic() - t0
        return self

    def close(self) -> None:
        """Cancel this cluster's jobs, stop the daemons started here, remove the temp folder."""
        if self._closed:
            return
        self._closed = True
        if self.reused:
            return
        if self._ctld is not None and self._ctld.poll() is None and self._slurmd is not None:
            self._cancel_all({**os.environ, **self.env()})
        _stop(self._slurmd)
        _stop(self._ctld)
        if self._munged_pid and not (_running("slurmctld") or _running("slurmd")):
            # another Slurm on this machine (e.g. a second LocalSlurm, started after this one found
            # munged working) may rely on it: then it is left running
            try:
                os.kill(self._munged_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------------ munge
    @staticmethod
    def _munge_ok() -> bool:
        try:
            return subprocess.run([which("munge"), "-n"], capture_output=True, timeout=10).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    def _start_munge(self) -> None:
        if self._munge_ok():
            return
        try:
            mu = pwd.getpwnam("munge")
        except KeyError:
            raise SlurmUnavailable(f"no user `munge` on this machine: reinstall munge ({INSTALL}).") from None
        for d, mode in ((MUNGE_KEY.parent, 0o700), (MUNGE_SOCKET_DIR, 0o755),
                        (Path("/var/lib/munge"), 0o711), (Path("/var/log/munge"), 0o700)):
            if not d.is_dir():
                d.mkdir(mode=mode, parents=True)
                os.chown(d, mu.pw_uid, mu.pw_gid)
        if not MUNGE_KEY.exists():  # an existing key is never replaced: other hosts may share it
            fd = os.open(MUNGE_KEY, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, os.urandom(1024))
            finally:
                os.close(fd)
            os.chown(MUNGE_KEY, mu.pw_uid, mu.pw_gid)
        with tempfile.TemporaryFile() as err:  # not a pipe: the daemon it forks could hold a pipe open
            r = subprocess.run([which("munged")], user=mu.pw_uid, group=mu.pw_gid, extra_groups=[],
                               stdin=subprocess.DEVNULL, stdout=err, stderr=err, timeout=30)
            err.seek(0)
            said = err.read().decode(errors="replace").strip()
        deadline = time.monotonic() + 10
        while not self._munge_ok():
            if time.monotonic() > deadline:
                raise SlurmUnavailable(f"munged did not start (exit {r.returncode}): {said}\n"
                                       f"{_tail(Path('/var/log/munge/munged.log'))}")
            time.sleep(0.1)
        try:
            self._munged_pid = int((MUNGE_SOCKET_DIR / "munged.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            self._munged_pid = None  # left running: it cannot be told from another munged

    # ------------------------------------------------------------------ slurm
    def _write_conf(self) -> Path:
        d = self.dir
        for sub in ("state", "spool"):
            (d / sub).mkdir()
        ctld_port, slurmd_port = _free_ports(2)
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        mem = max(256, int(_mem_mb() * 0.9))  # below the total: slurmd drains a node that has less than this
        conf = d / "slurm.conf"
        conf.write_text(f"""\
# Written by labtools.slurm_local.LocalSlurm: a one-node test cluster; removed when it stops.
ClusterName={self.cluster}
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
KillWait={self.kill_wait}
# `sbatch --wait` polls with a sleep of 2 s, times 4 while that is below MinJobAge/2 (up to 32 s):
# with the default 300 a 25 s job returned after 42 s, a 45 s one after 74 s. 5 keeps it at 2 s;
# ended jobs stay in squeue -t all / scontrol show job for 5 to 65 s (slurmctld minimum: 2).
MinJobAge=5
MailProg=/bin/true
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        return conf

    def _daemon(self, name: str, env: dict) -> subprocess.Popen:
        out = open(self.dir / f"{name}.stderr", "wb")
        try:
            return subprocess.Popen([which(name), "-D", "-f", str(self.conf)], env=env, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            out.close()

    @staticmethod
    def _sinfo_ok(env: dict) -> bool:
        try:
            return subprocess.run([which("sinfo"), "-h"], env=env, capture_output=True, timeout=10).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    def _node_state(self, env: dict) -> str:
        try:
            r = subprocess.run([which("sinfo"), "-h", "-N", "-n", self.host, "-o", "%t"], env=env,
                               capture_output=True, text=True, timeout=10)
        except subprocess.TimeoutExpired:
            return "(sinfo timed out)"
        return r.stdout.strip() if r.returncode == 0 else f"(sinfo: {r.stderr.strip()})"

    def logs(self) -> str:
        """The daemons' log tails (for error messages)."""
        if self.dir is None:
            return ""
        return "\n".join(f"{f.name}:\n{_tail(f)}" for f in
                         (self.dir / n for n in ("slurmctld.log", "slurmctld.stderr", "slurmd.log", "slurmd.stderr"))
                         if f.exists())

    def _wait_idle(self, env: dict) -> None:
        deadline, state = time.monotonic() + self.timeout, ""
        while True:
            for name, p in (("slurmctld", self._ctld), ("slurmd", self._slurmd)):
                if p.poll() is not None:
                    raise SlurmUnavailable(f"{name} exited with status {p.returncode} while starting "
                                           f"(config {self.conf}).\n{self.logs()}")
            state = self._node_state(env)
            if state == "idle":
                return
            if time.monotonic() > deadline:
                raise SlurmUnavailable(f"node {self.host} not idle after {self.timeout:.0f} s (sinfo says "
                                       f"{state or 'nothing'}; config {self.conf}).\n{self.logs()}")
            time.sleep(0.2)

    def _cancel_all(self, env: dict) -> None:
        """Cancel every job of this (private) cluster and wait until they are gone."""
        squeue, scancel = which("squeue"), which("scancel")
        try:
            ids = subprocess.run([squeue, "-h", "-o", "%A"], env=env, capture_output=True, text=True,
                                 timeout=10).stdout.split()
            if not ids:
                return
            subprocess.run([scancel, *ids], env=env, capture_output=True, timeout=10)
            deadline = time.monotonic() + self.kill_wait + 10
            while time.monotonic() < deadline:
                r = subprocess.run([squeue, "-h", "-o", "%A"], env=env, capture_output=True, text=True, timeout=10)
                if r.returncode == 0 and not r.stdout.split():
                    return
                time.sleep(0.5)
        except (OSError, subprocess.TimeoutExpired):
            pass


if __name__ == "__main__":  # python -m labtools.slurm_local [--hold]: bring a cluster up, show it, stop it
    import sys

    with LocalSlurm() as s:
        print("reused the running cluster" if s.reused else f"up in {s.startup_s:.1f} s", flush=True)
        subprocess.run([which("sinfo")], env={**os.environ, **s.env()})
        if sys.argv[1:] == ["--hold"]:
            print("".join(f"export {k}={v}\n" for k, v in s.env().items()) + "holding; Ctrl-C stops it", flush=True)
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            signal.sigwait({signal.SIGINT, signal.SIGTERM})  # then close(): jobs cancelled, daemons stopped
