"""Inside the emulated arm64 root (bench/arm64/check.sh): the installed wheel builds its kernels and
trains a CIFAR-10 subset at np = 2, once with the kernels and once on the fallbacks; writes JSON
(machine, versions, kernels per rank, final weight digests, times) to the path given.

Both runs must complete and give the same digests (the kernels change speed, not numbers), and the
first must name the fused and in-graph kernels on every process; otherwise it exits 1 after writing.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

BIN = Path(sys.executable).parent
# qemu-user lacks process_vm_readv: MPICH's CMA path for large messages fails without this
ENV = {**os.environ, "MPIR_CVAR_CH4_CMA_ENABLE": "0"}
TRAIN = ["--epochs", "1", "--limit-train", "240", "--limit-test", "96", "--sync", "allreduce", "--threads", "1",
         "--quiet"]


def sh(cmd: list[str], env=None, timeout=3600) -> tuple[subprocess.CompletedProcess, float]:
    t = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env or ENV, timeout=timeout)
    return r, round(time.time() - t, 1)


def main(out: str) -> int:
    res = {"machine": platform.machine(), "python": platform.python_version(),
           "versions": {p: metadata.version(p) for p in ("labtools", "tensorflow", "mpi4py", "mpich")},
           "times_s": {k: float(os.environ.get(v, "nan")) for k, v in
                       (("root_fs", "T_ROOT"), ("wheels_download", "T_WHEELS"), ("venv_install", "T_INSTALL"))},
           "train_args": TRAIN, "emulated": "qemu-user (binfmt_misc)", "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    r, res["times_s"]["kernels_build"] = sh([str(BIN / "labtools"), "kernels", "build"])
    res["kernels_build"] = r.stdout.strip().splitlines()[1:] + r.stderr.strip().splitlines()[-3:]
    r, res["times_s"]["kernels_check"] = sh([str(BIN / "labtools"), "kernels", "check"])
    res["kernels_check"] = r.stdout.strip().splitlines()[1:]
    runs = Path(tempfile.mkdtemp(prefix="arm-runs-"))
    for name, extra in (("kernels", {}), ("fallback", {"LABTOOLS_FUSED_ADAM": "0", "LABTOOLS_MPI_OP": "0"})):
        r, t = sh([str(BIN / "mpiexec"), "-n", "2", str(BIN / "labtools"), "train", *TRAIN, "--out", str(runs),
                   "--experiment", name], env={**ENV, **extra})
        one = {"rc": r.returncode, "wall_s": t, "env": extra}
        d = next((runs / name).glob("*/manifest.json"), None)
        if d is not None:
            m = json.loads(d.read_text())
            one.update(status=m.get("status"), kernels=m.get("kernels"), mpi_library=m.get("mpi_library"))
            s = d.parent / "summary.json"
            if s.exists():
                s = json.loads(s.read_text())
                one.update(final_weight_digests=s.get("final_weight_digests"), global_wall_s=s.get("global_wall_s"),
                           test_acc=s.get("test_acc"))
        if r.returncode:
            one["stderr_tail"] = r.stderr[-2000:]
        res[name] = one
        res["times_s"][f"train_{name}"] = t
    k, f = res["kernels"], res["fallback"]
    procs = (k.get("kernels") or {}).get("processes") or []
    res["kernels_on_every_process"] = len(procs) == 2 and all(
        p.get("fused_adam") == "fused kernel" and p.get("mpi_op") == "in-graph op" for p in procs)
    res["same_digests"] = bool(k.get("final_weight_digests")) and k.get("final_weight_digests") == f.get("final_weight_digests")
    ok = k.get("status") == f.get("status") == "completed" and res["kernels_on_every_process"] and res["same_digests"]
    res["ok"] = ok
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: res[k] for k in ("machine", "ok", "kernels_on_every_process", "same_digests", "times_s")}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
