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


SHARDED = r"""
import sys
import numpy as np, tensorflow as tf
from mpi4py import MPI
from labtools import mpi_op
from labtools.comm import PEER_MARK

step, gather = mpi_op.sharded_ops()
c = MPI.COMM_WORLD
r, P, h = c.Get_rank(), c.Get_size(), np.int64(c.py2f())
shapes = [(5, 7), (1000,), (1,), (3, 3, 4, 9)]  # shares cut across variables, one of them a single value
same = np.random.default_rng(7)  # the state every process holds before the step
w0, m0 = ([same.normal(size=s).astype(np.float32) for s in shapes] for _ in range(2))
v0 = [np.abs(same.normal(size=s)).astype(np.float32) for s in shapes]
grads = [[np.random.default_rng(100 * q + i).normal(size=s).astype(np.float32) for i, s in enumerate(shapes)]
         for q in range(P)]  # process q's gradients (every process can compute every process's)
alpha, c1, c2, eps = np.float32(1e-3), np.float32(0.1), np.float32(0.001), np.float32(1e-7)

# the reference: the sum in rank order, then Keras's Adam arithmetic in float32, on every parameter
ref_w, ref_m, ref_v, sumsq = [], [], [], 0.0
for i in range(len(shapes)):
    g = grads[0][i].copy()
    for q in range(1, P):
        g = g + grads[q][i]
    m = m0[i] + (g - m0[i]) * c1
    v = v0[i] + (g * g - v0[i]) * c2
    ref_w.append(w0[i] - (m * alpha) / (np.sqrt(v) + eps))
    ref_m.append(m)
    ref_v.append(v)
    sumsq += float(np.sum(g.astype(np.float64) ** 2))

W, M, V = ([tf.Variable(a) for a in arrs] for arrs in (w0, m0, v0))
run = tf.function(lambda gs: step([x.handle for x in W], [x.handle for x in M], [x.handle for x in V], gs,
                                  alpha, c1, c2, eps, h))
out = float(run([tf.constant(g) for g in grads[r]]))
checks = {"weights": all(np.array_equal(x.numpy(), e) for x, e in zip(W, ref_w)),
          "sumsq": abs(out - sumsq) <= 1e-5 * sumsq}
gather([x.handle for x in M], h)
gather([x.handle for x in V], h)
checks["moments"] = all(np.array_equal(x.numpy(), e) for X, E in ((M, ref_m), (V, ref_v)) for x, e in zip(X, E))

# process 1 fails before the next step: it joins with its flag set, the others' step raises PEER_MARK
# and no weight moves
before = [x.numpy() for x in W]
if r == 1:
    mpi_op.fail_sharded_step(c, [int(np.prod(s)) for s in shapes])
    said = "FAILED"
else:
    try:
        run([tf.constant(g) for g in grads[r]])
        said = "NOT RAISED"
    except tf.errors.AbortedError as e:
        said = f"RAISED {PEER_MARK in e.message} {'1 process(es) failed' in e.message}"
checks["unmoved"] = all(np.array_equal(x.numpy(), b) for x, b in zip(W, before))
open(f"{sys.argv[1]}/rank{r}.txt", "w").write(f"{checks} {said}")
"""


@pytest.mark.parametrize("processes", [2, 3])
def test_sharded_adam_step_is_the_summed_adam_step_and_raises_on_a_peer_failure(tmp_path, processes):
    """LabtoolsShardedAdam (each process sums and updates its share, then the weights are exchanged)
    leaves every process with the weights of Adam on the gradients summed in rank order, bit for bit;
    LabtoolsShardGather brings back the whole moments; a failed peer's flag fails the step."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    r = subprocess.run([mpiexec(), "-n", str(processes), sys.executable, "-c", SHARDED, str(tmp_path)],
                       capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    ok = "{'weights': True, 'sumsq': True, 'moments': True, 'unmoved': True}"
    want = [f"{ok} FAILED" if q == 1 else f"{ok} RAISED True True" for q in range(processes)]
    assert [(tmp_path / f"rank{q}.txt").read_text() for q in range(processes)] == want
