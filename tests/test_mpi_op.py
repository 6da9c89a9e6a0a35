"""labtools.mpi_op: the in-graph Allreduce gives mpi4py's sum bit for bit, and a peer's failure flag
fails the step with the mark labtools.comm.phase knows."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import BIN, REPO, mpiexec

pytestmark = [pytest.mark.mpi]

SCRIPT = r"""
import sys
import numpy as np, tensorflow as tf
from mpi4py import MPI
from labtools import mpi_op
from labtools.comm import PEER_MARK

op = mpi_op.allreduce_op()
assert op is not None, mpi_op.reason()
c = MPI.COMM_WORLD
r, h = c.Get_rank(), np.int64(c.py2f())
a = np.random.default_rng(r).normal(size=738_001).astype(np.float32)
a[-1] = 0.0
ref = np.empty_like(a)
c.Allreduce(a, ref, op=MPI.SUM)
in_graph = tf.function(lambda x: op(x * 1.0, h))  # an intermediate buffer: reduced in place
assert np.array_equal(in_graph(tf.constant(a)).numpy(), ref), "in-graph sum differs from mpi4py's"
assert np.array_equal(op(tf.constant(a), h).numpy(), ref), "eager sum differs from mpi4py's"
b = np.zeros(10, np.float32)
b[-1] = 1.0 if r == 1 else 0.0  # process 1 joins with the failure flag set, as comm.fail_step does
try:
    in_graph(tf.constant(b))
    said = "NOT RAISED"
except tf.errors.AbortedError as e:
    said = f"RAISED {PEER_MARK in e.message} {'1 process(es) failed' in e.message}"
open(f"{sys.argv[1]}/rank{r}.txt", "w").write(said)  # one file each: two ranks' stdout interleave
"""


def test_in_graph_allreduce_is_mpi4pys_sum_and_raises_on_a_peer_failure(tmp_path):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    r = subprocess.run([mpiexec(), "-n", "2", sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True,
                       text=True, timeout=300, cwd=REPO, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [(tmp_path / f"rank{i}.txt").read_text() for i in (0, 1)] == ["RAISED True True"] * 2
