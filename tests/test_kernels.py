"""Kernel builds cached both ways (labtools.opbuild) and the kernel agreement (labtools.kernels), without MPI."""
from __future__ import annotations

import pytest

from labtools import kernels, opbuild


def test_a_failed_build_is_cached_and_retried_only_when_asked(tmp_path, monkeypatch):
    monkeypatch.setenv(opbuild.ENV_CACHE, str(tmp_path))
    monkeypatch.setenv("CXX", "/bin/false")  # a compiler that always fails
    with pytest.raises(opbuild.BuildFailed, match="exit 1") as first:
        opbuild.build("fused_adam")
    assert "cached" not in str(first.value)
    (note,) = tmp_path.glob("fused_adam-*.failed.json")
    stamp = note.stat().st_mtime_ns
    with pytest.raises(opbuild.BuildFailed, match="cached in .*kernels build` tries again"):
        opbuild.build("fused_adam")  # from the note: nothing compiled
    assert note.stat().st_mtime_ns == stamp
    with pytest.raises(opbuild.BuildFailed, match="exit 1") as retried:
        opbuild.build("fused_adam", retry=True)
    assert "cached" not in str(retried.value)


def test_a_library_built_elsewhere_is_found_without_a_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv(opbuild.ENV_CACHE, str(tmp_path))
    _, out = opbuild.command("fused_adam")
    with pytest.raises(opbuild.BuildFailed, match="not built"):
        opbuild.build("fused_adam", compile_missing=False)
    out.write_bytes(b"built on a login node")  # the key does not name the compiler
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setenv("PATH", "/nonexistent")
    assert opbuild.build("fused_adam") == out


def test_agreement_uses_a_kernel_only_if_every_process_has_it():
    every = [{"host": "a", "kernels": {"fused_adam": None, "mpi_op": None}},
             {"host": "b", "kernels": {"fused_adam": "turned off by LABTOOLS_FUSED_ADAM=0", "mpi_op": None}}]
    a = kernels.Agreement(["fused_adam", "mpi_op"], every)
    assert a.use == {"fused_adam": False, "mpi_op": True}
    assert a.reason("fused_adam") == "keras apply (process 1 on b: turned off by LABTOOLS_FUSED_ADAM=0)"
    assert a.reason("mpi_op") == "in-graph op"
    assert [p["fused_adam"] for p in a.processes] == ["fused kernel", "keras apply (turned off by LABTOOLS_FUSED_ADAM=0)"]
