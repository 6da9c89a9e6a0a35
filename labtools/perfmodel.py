"""A cluster performance model for data-parallel SqueezeNet training (the paper's §2.3-3.4, Table 2).

    epoch time = compute + sync
    compute    = images per rank x seconds per image (one rank, at its batch size)
    sync       = syncs per epoch x cost of one collective; a message of n bytes costs alpha + beta*n

A node holds ``ranks_per_node`` ranks. Ranks of one node talk over ``local`` (shared memory); nodes
talk over ``net``, one full-duplex NIC per node shared by its ranks. Ranks are placed in blocks
(ranks 0,1 on node 0, ...), as the paper's machinefile does. Collectives follow MPICH's algorithms
for a long message (the 2.9 MB weight vector); each function's docstring gives its closed form.

Calibrations take the paper's constants (labtools.paper) or measurements as arguments; every
function here is pure (no I/O, no MPI, no TensorFlow). bench/perfmodel_report.py applies the model.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from . import paper
from .data import TRAIN_SIZE

FLOAT32_BYTES = 4
# MPICH's Bcast picks scatter + ring allgather at or above both of these (MPIR_CVAR_BCAST_LONG_MSG_SIZE,
# MPIR_CVAR_BCAST_MIN_PROCS); below, a binomial tree.
BCAST_LONG_BYTES = 524288
BCAST_MIN_PROCS = 8


# ------------------------------------------------------------------ parameters

@dataclass(frozen=True)
class Link:
    """Hockney cost of one point-to-point message: alpha + beta * bytes."""

    alpha_s: float
    beta_s_per_byte: float

    def msg(self, nbytes: float) -> float:
        return self.alpha_s + self.beta_s_per_byte * nbytes


@dataclass(frozen=True)
class Machine:
    """A cluster: per-rank compute speed, the two links, and ranks per node."""

    s_per_image: float  # one rank's training seconds per image, at batch_per_rank
    net: Link
    local: Link
    ranks_per_node: int = 2
    batch_per_rank: int = 12
    name: str = ""
    # mpi4py's lower-case gather/bcast (the paper's, labtools.sync's) pickle every message: seconds per
    # byte a pickled message costs beyond a buffer one (dumps, a fresh receive buffer, loads).
    pickle_s_per_byte: float = 0.0


@dataclass(frozen=True)
class Strategy:
    """How ranks agree (labtools.sync): ``sync`` as RunConfig names it, ``every`` = local-sgd's H,
    ``impl`` = the collective ("gather-bcast", "ring", "recursive-doubling"), ``compute_overhead`` =
    extra compute per image as a fraction (allreduce's gradient packing)."""

    name: str
    sync: str = "epoch-average"
    every: int | None = None
    impl: str = "gather-bcast"
    compute_overhead: float = 0.0


def link_from_rate(rate: str, alpha_s: float = 0.0) -> Link:
    """A link at tc's nominal rate ("1gbit", "100mbit"): beta = 8 / bits per second."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?)bit", rate.strip().lower())
    if not m:
        raise ValueError(f"rate {rate!r}: expected e.g. '1gbit' or '100mbit'")
    bits = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]
    return Link(alpha_s, 8.0 / bits)


def fit_link(nbytes, seconds, small_max: int = 8192, large_min: int = BCAST_LONG_BYTES) -> Link:
    """alpha, beta from one-way message times, each by least squares in its own regime: alpha is the
    intercept of the line through the small messages (<= small_max), beta the slope of the line through
    the large ones (>= large_min). One line through all sizes is bent by what lies between: eager vs
    rendezvous protocols, and tbf's burst (256 kB pass a shaped link at full speed)."""
    import numpy as np

    n, t = np.asarray(nbytes, float), np.asarray(seconds, float)
    small, large = n <= small_max, n >= large_min
    if small.sum() < 2 or large.sum() < 2:
        raise ValueError("fit_link needs at least two small and two large message sizes")
    alpha = np.polyfit(n[small], t[small], 1)[1]
    beta = np.polyfit(n[large], t[large], 1)[0]
    return Link(float(alpha), float(beta))


# ------------------------------------------------------------------ compute

def images_per_rank(np_: int, n_train: int = TRAIN_SIZE) -> int:
    """The slowest rank's shard under strided sharding (§3.2.2): ceil(n_train / np)."""
    return -(-n_train // np_)


def steps_per_epoch(np_: int, batch_per_rank: int, n_train: int = TRAIN_SIZE) -> int:
    return -(-images_per_rank(np_, n_train) // batch_per_rank)


def table1_row(batch_per_node: int) -> dict:
    rows = [r for r in paper.TABLE1 if r["batch_per_node"] == batch_per_node]
    if not rows:
        raise ValueError(f"paper Table 1 has no batch_per_node {batch_per_node}")
    return rows[0]


def s_per_image_table1(batch_per_node: int = 24) -> float:
    """One rank's seconds per image from Table 1: a step trains batch_per_rank images on each
    rank of the node at once, so mean_step_s / batch_per_rank."""
    r = table1_row(batch_per_node)
    return r["mean_step_s"] / r["batch_per_rank"]


def table2_base() -> dict:
    """Table 2's baseline row (the smallest np; speedups are relative to it)."""
    return min(paper.TABLE2, key=lambda r: r["np"])


def s_per_image_table2_base(m: Machine, n_bytes: float) -> float:
    """One rank's seconds per image implied by Table 2's baseline run (np = 2 on one RPi), its one
    intra-node weight average per epoch (priced on machine m) taken off."""
    b = table2_base()
    sync = epoch_time(Strategy("epoch-average"), b["np"], m, n_bytes)["sync_s"]
    return (b["wall_s"] / b["epochs"] - sync) / images_per_rank(b["np"])


# ------------------------------------------------------------------ collectives

def _split(p: int, r: int) -> tuple[int, int]:
    """(ranks per node actually used, nodes) for p ranks placed r to a node."""
    k = min(r, p)
    return k, -(-p // k)


def gather_root(p: int, n: float, net: Link, local: Link, r: int = 1) -> float:
    """mpi4py's pickled gather (a linear Gatherv): the root takes its node's k-1 messages over
    shared memory and the other p-k through its one NIC, one after another:
    (k-1)(a_l + n b_l) + (p-k)(a + n b)."""
    k, _ = _split(p, r)
    return (k - 1) * local.msg(n) + (p - k) * net.msg(n)


def _tree_rounds(p: int, r: int) -> tuple[int, int]:
    """(local rounds, network rounds) of a binomial tree / recursive doubling over p ranks in
    blocks of r: partners at distance < r share a node."""
    rounds = math.ceil(math.log2(p)) if p > 1 else 0
    local_rounds = min(rounds, math.ceil(math.log2(min(r, p)))) if p > 1 else 0
    return local_rounds, rounds - local_rounds


def bcast_binomial(p: int, n: float, net: Link, local: Link, r: int = 1) -> float:
    """Binomial tree, farthest partner first (MPICH): ceil(log2 p) rounds of one message. The rounds
    between nodes come first, while each node holds the data on one rank only, so no NIC carries two
    messages at once: (network rounds)(a + n b) + (local rounds)(a_l + n b_l)."""
    lr, nr = _tree_rounds(p, r)
    return lr * local.msg(n) + nr * net.msg(n)


def bcast_scatter_allgather(p: int, n: float, net: Link, local: Link, r: int = 1) -> float:
    """Scatter (binomial) then ring allgather: (log2 p + p - 1) a + 2 (p-1)/p n b. The ring's
    hops between nodes are one per NIC per direction, so sharing the NIC costs nothing here."""
    if p == 1:
        return 0.0
    link = net if _split(p, r)[1] > 1 else local
    return math.ceil(math.log2(p)) * link.alpha_s + (p - 1) / p * n * link.beta_s_per_byte + \
        (p - 1) * link.msg(n / p)


def bcast(p: int, n: float, net: Link, local: Link, r: int = 1) -> float:
    """MPICH's choice for one Bcast of n bytes."""
    if n >= BCAST_LONG_BYTES and p >= BCAST_MIN_PROCS:
        return bcast_scatter_allgather(p, n, net, local, r)
    return bcast_binomial(p, n, net, local, r)


def gather_bcast(p: int, n: float, net: Link, local: Link, r: int = 1, pickle_s_per_byte: float = 0.0) -> float:
    """The paper's average (§3.2.3): comm.gather() to the root, average there, comm.bcast() back.
    Pickling adds p + 1 pickled-message costs (pickle_s_per_byte * n each, one dump and one load) on
    the critical path: the root unpickles p arrays (its own too) and pickles the average, which a
    receiver unpickles."""
    if p == 1:
        return 0.0
    return gather_root(p, n, net, local, r) + bcast(p, n, net, local, r) + (p + 1) * pickle_s_per_byte * n


def allreduce_ring(p: int, n: float, net: Link, local: Link, r: int = 1) -> float:
    """Ring reduce-scatter + allgather: 2(p-1)(a + n/p b) = 2(p-1) a + 2(p-1)/p n b. Each step
    waits for its slowest hop, a network one as soon as there are two nodes; with block placement
    each NIC carries one hop per direction, so ranks_per_node does not change it. (MPICH's long-
    message Allreduce, Rabenseifner's, has the same bandwidth term.)"""
    if p == 1:
        return 0.0
    link = net if _split(p, r)[1] > 1 else local
    return 2 * (p - 1) * link.msg(n / p)


def allreduce_recursive_doubling(p: int, n: float, net: Link, local: Link, r: int = 1) -> float:
    """Recursive doubling: log2 p rounds exchanging all n bytes: log2 p (a + n b) for p a power of
    two and one rank per node. Partners at distance >= r are on another node and all k ranks of
    a node exchange at once through its NIC: (a + k n b) per network round. A p that is not a power
    of two costs two more full exchanges (MPICH folds the extra ranks in, then out)."""
    if p == 1:
        return 0.0
    k, nodes = _split(p, r)
    pof2 = 1 << (p.bit_length() - 1)
    lr, nr = _tree_rounds(pof2, k)
    extra = 0 if pof2 == p else 2 * (net if nodes > 1 else local).msg(n)
    return lr * local.msg(n) + nr * net.msg(k * n) + extra


IMPLS = {"gather-bcast": gather_bcast, "ring": allreduce_ring, "recursive-doubling": allreduce_recursive_doubling}


def collective(impl: str, p: int, n: float, m: Machine) -> float:
    """One collective of n bytes over p ranks of machine m (only the pickled path pays pickling)."""
    if impl == "gather-bcast":
        return gather_bcast(p, n, m.net, m.local, m.ranks_per_node, m.pickle_s_per_byte)
    return IMPLS[impl](p, n, m.net, m.local, m.ranks_per_node)


# ------------------------------------------------------------------ epochs and runs

def syncs_per_epoch(s: Strategy, steps: int) -> int:
    if s.sync == "epoch-average":
        return 1
    if s.sync == "local-sgd":
        return -(-steps // s.every) if s.every else 1
    if s.sync == "allreduce":
        return steps
    raise ValueError(f"unknown sync {s.sync!r}")


def epoch_time(s: Strategy, np_: int, m: Machine, n_bytes: float, n_train: int = TRAIN_SIZE) -> dict:
    """One epoch on the slowest rank: {compute_s, sync_s, syncs, epoch_s}. A collective is a
    barrier, so compute and sync add (nothing overlaps in labtools.sync or the paper's script)."""
    steps = steps_per_epoch(np_, m.batch_per_rank, n_train)
    compute = images_per_rank(np_, n_train) * m.s_per_image * (1.0 + s.compute_overhead)
    k = syncs_per_epoch(s, steps) if np_ > 1 else 0
    one = collective(s.impl, np_, n_bytes, m) if k else 0.0
    return {"compute_s": compute, "sync_s": k * one, "syncs": k, "epoch_s": compute + k * one}


def run_time(s: Strategy, np_: int, m: Machine, n_bytes: float, epochs: int, n_train: int = TRAIN_SIZE) -> float:
    return epochs * epoch_time(s, np_, m, n_bytes, n_train)["epoch_s"]


def speedup(t_base: float, t: float) -> float:
    return t_base / t


def efficiency_pct(s: float, np_: int, base_np: int) -> float:
    """The paper's definition (§3.3): E = S / (np / base np) x 100 %."""
    return 100.0 * s / (np_ / base_np)


def scaling_curve(s: Strategy, nps, m: Machine, n_bytes: float, epochs: int, base_np: int | None = None):
    """Predicted wall time, speedup and efficiency per np (Figures 8, 9, 11) as a DataFrame."""
    import pandas as pd

    nps = sorted(nps)
    base_np = base_np or nps[0]
    t_base = run_time(s, base_np, m, n_bytes, epochs)
    rows = []
    for n in nps:
        e = epoch_time(s, n, m, n_bytes)
        wall = epochs * e["epoch_s"]
        sp = speedup(t_base, wall)
        rows.append({"strategy": s.name, "np": n, "nodes": -(-n // m.ranks_per_node),
                     "compute_s": epochs * e["compute_s"], "sync_s": epochs * e["sync_s"],
                     "syncs_per_epoch": e["syncs"], "wall_s": wall, "speedup": sp,
                     "efficiency_pct": efficiency_pct(sp, n, base_np)})
    return pd.DataFrame(rows)


def strategies(profile_strategies: dict, allreduce_overhead: float = 0.0) -> list[Strategy]:
    """Model strategies for labtools.profiles.STRATEGIES-style entries (RunConfig overrides).
    Strategies with the same sync and period time alike, so each timing appears once; per-step
    allreduce appears twice, ring and recursive doubling."""
    out, seen = [], set()
    for name, over in profile_strategies.items():
        sync, every = over.get("sync", "epoch-average"), over.get("sync_every") or None
        if (sync, every) in seen:
            continue
        seen.add((sync, every))
        if sync == "allreduce":
            for impl in ("ring", "recursive-doubling"):
                out.append(Strategy(f"{name}, {impl}", sync, None, impl, allreduce_overhead))
        else:
            impl = "ring" if over.get("average_impl") == "allreduce" else "gather-bcast"
            out.append(Strategy(name, sync, every, impl))
    return out


# ------------------------------------------------------------------ the paper's Table 2

def table2_model(machines: dict, n_bytes: float, strategy: Strategy = Strategy("epoch-average (paper)")):
    """Predicted Table 2 beside the paper's, one row per paper row. ``machines``: {label: Machine},
    one per calibration; for each, the predicted wall time, its error against the paper
    ((model - paper) / paper, %), and predicted speedup and efficiency."""
    base = table2_base()
    t2 = paper.table2()
    out = t2[["rpis", "np", "epochs", "wall_s", "speedup", "efficiency_pct"]].rename(
        columns={"wall_s": "paper_wall_s", "speedup": "paper_speedup", "efficiency_pct": "paper_efficiency_pct"})
    for label, m in machines.items():
        t_base = run_time(strategy, base["np"], m, n_bytes, base["epochs"])
        walls, syncs = [], []
        for r in paper.TABLE2:
            e = epoch_time(strategy, r["np"], m, n_bytes)
            walls.append(r["epochs"] * e["epoch_s"])
            syncs.append(r["epochs"] * e["sync_s"])
        out[f"{label}_wall_s"] = walls
        out[f"{label}_sync_s"] = syncs
        out[f"{label}_error_pct"] = 100.0 * (out[f"{label}_wall_s"] - out["paper_wall_s"]) / out["paper_wall_s"]
        out[f"{label}_speedup"] = t_base / out[f"{label}_wall_s"]
        out[f"{label}_efficiency_pct"] = [efficiency_pct(s, n, base["np"]) for s, n in
                                          zip(out[f"{label}_speedup"], out["np"])]
    return out


def consistency(n_bytes: float, net: Link, batch_per_node: int = 24, ranks_per_node: int = 2,
                n_train: int = TRAIN_SIZE):
    """Where the paper's own numbers contradict each other, as arithmetic on labtools.paper's
    constants: a DataFrame of (check, arithmetic, value). ``net`` prices bytes on the nodes' link."""
    import pandas as pd

    t1 = table1_row(batch_per_node)
    rows = {r["np"]: r for r in paper.TABLE2}
    base = table2_base()
    epochs, b_np = base["epochs"], base["np"]
    out = []

    def add(check, arithmetic, value):
        out.append({"check": check, "arithmetic": arithmetic, "value": value})

    node_rate = t1["batch_per_node"] / t1["mean_step_s"]
    add("Table 1 node throughput at its best batch",
        f"{t1['batch_per_node']} img / {t1['mean_step_s']} s per step = {node_rate:.2f} img/s "
        f"(printed: {t1['global_img_per_s']})", node_rate)
    sweep_images = t1["avg_epoch_s"] * t1["global_img_per_s"]
    add("Table 1's 'epoch' is not a CIFAR-10 epoch",
        f"{t1['avg_epoch_s']} s x {t1['global_img_per_s']} img/s = {sweep_images:,.0f} images "
        f"({t1['avg_epoch_s'] / t1['mean_step_s']:.0f} steps), not {n_train:,}", sweep_images)
    epoch_t1 = n_train / t1["global_img_per_s"]
    add("one full epoch on one RPi at Table 1's rate",
        f"{n_train:,} / {t1['global_img_per_s']} img/s = {epoch_t1:,.0f} s", epoch_t1)
    run_t1 = epochs * epoch_t1
    add(f"Table 1 predicts Table 2's np = {b_np} (one RPi, {epochs} epochs)",
        f"{epochs} x {epoch_t1:,.0f} s = {run_t1:,.0f} s vs Table 2's {base['wall_s']:,.2f} s "
        f"({run_t1 / base['wall_s']:.2f}x)", run_t1)
    implied = epochs * n_train / base["wall_s"]
    add(f"node throughput Table 2's np = {b_np} implies",
        f"{epochs} x {n_train:,} / {base['wall_s']:,.2f} s = {implied:.2f} img/s per node = "
        f"{implied / t1['global_img_per_s']:.2f}x Table 1's best ({t1['global_img_per_s']}); "
        f"above every Table 1 row (max {max(r['global_img_per_s'] for r in paper.TABLE1)})", implied)
    # np = 8 against np = 4: halving the shard should nearly halve the time.
    a, b = rows[4], rows[8]
    ideal = a["wall_s"] * a["np"] / b["np"]
    excess = b["wall_s"] - ideal
    per_epoch = excess / b["epochs"]
    vectors = per_epoch / (n_bytes * net.beta_s_per_byte)
    paper_sync = gather_bcast(b["np"], n_bytes, net, Link(0.0, 0.0), ranks_per_node)
    add("np = 8 is barely faster than np = 4",
        f"{a['wall_s']:,.2f} s x {a['np']}/{b['np']} = {ideal:,.2f} s expected, Table 2 has {b['wall_s']:,.2f} s "
        f"({100 * (1 - b['wall_s'] / a['wall_s']):.1f} % faster than np = {a['np']})", b["wall_s"])
    add(f"np = {b['np']}'s excess as network time",
        f"({b['wall_s']:,.2f} - {ideal:,.2f}) s / {b['epochs']} epochs = {per_epoch:.1f} s per epoch = "
        f"{vectors:,.0f} weight vectors of {n_bytes / 1e6:.2f} MB at {1e-6 / net.beta_s_per_byte:.0f} MB/s; the paper's "
        f"gather + bcast at np = {b['np']} takes {paper_sync:.3f} s per epoch on that link ({per_epoch / paper_sync:,.0f}x less)",
        per_epoch / paper_sync)
    for lo, hi in ((8, 16), (40, 48)):
        x, y = rows[lo], rows[hi]
        add(f"efficiency rises from np = {lo} to np = {hi}",
            f"E({lo}) = {x['efficiency_pct']} % < E({hi}) = {y['efficiency_pct']} %: time falls "
            f"{x['wall_s'] / y['wall_s']:.2f}x for {hi / lo:.2f}x the ranks", y["efficiency_pct"] - x["efficiency_pct"])
    printed = max(abs(r["speedup"] - base["wall_s"] / r["wall_s"]) for r in paper.TABLE2)
    add("printed speedups equal T(2) / T(np)", f"largest difference {printed:.2g}", printed)
    return pd.DataFrame(out)


def with_compute(m: Machine, s_per_image: float, name: str | None = None) -> Machine:
    return replace(m, s_per_image=s_per_image, name=name if name is not None else m.name)
