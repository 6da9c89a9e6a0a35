"""Facts about a run, decided once, and the one place where old records are brought up to date.

``wall_time_kind`` is decided when a run is recorded (train.run) and only read afterwards.
``migrate`` is the only shim for records written by older code: every reader (results.load_runs,
the reuse index) sees records through it, so no other module needs to know what older records lack.
Files on disk are never rewritten: the migration happens in memory, every time they are read.
"""
from __future__ import annotations

from collections import Counter

from . import numerics
from .config import RunConfig
from .metrics import is_at_chance, is_collapsed

CLUSTER = "cluster: one process per rank, no more processes than cores"
OVERSUBSCRIBED = "not a cluster time: more processes than cores on a host"
LOGICAL = "not a cluster time: logical ranks (P<N)"
UNKNOWN = "not a cluster time: cores per host not recorded"
CONTENDED = "not a cluster time: other load on a host during the run"
UNKNOWN_LOAD = "not a cluster time: other load on the hosts not recorded"
RESUMED = "not a cluster time: a resumed run (the sum of its launches' training times)"
EMULATED = "not a cluster time: emulated hosts (network namespaces) sharing one machine's cores"
KINDS = (CLUSTER, OVERSUBSCRIBED, LOGICAL, CONTENDED, UNKNOWN, UNKNOWN_LOAD, RESUMED, EMULATED)
# Other work on a host, in cores averaged over the run, above which its times are not a benchmark.
MAX_OTHER_CORES = 0.3


def wall_time_kind(world: int, processes: int, hosts: list | None, cores_per_host: dict | None,
                   other_cores: dict | None = None) -> str:
    """Is a run's wall time what a cluster of `world` ranks would take? Only with one process per rank
    (P = N), no host running more processes than it has cores, and no other work on those hosts
    (other_cores: host -> cores busy with anything but this run, averaged over the run; None when
    it was not measured)."""
    if processes != world:
        return LOGICAL
    if not cores_per_host or not hosts:
        return UNKNOWN
    if any(n > cores_per_host.get(h, n) for h, n in Counter(hosts).items()):
        return OVERSUBSCRIBED
    if other_cores is None:
        return UNKNOWN_LOAD
    if any(v > MAX_OTHER_CORES for v in other_cores.values()):
        return CONTENDED
    return CLUSTER


def other_load(spans: list) -> dict:
    """host -> cores busy with other work, from each process's (host, wall s, own CPU s, host CPU s)."""
    by_host: dict = {}
    for host, wall, own, busy in spans:
        h = by_host.setdefault(host, {"own": 0.0, "busy": busy, "wall": wall})
        h["own"] += own
        h["wall"] = max(h["wall"], wall)
    return {host: max(h["busy"] - h["own"], 0.0) / max(h["wall"], 1e-9) for host, h in by_host.items()}


# Commits of records written before manifests carried "numerics_version" (found with
# `git merge-base --is-ancestor f0d0e88 COMMIT` when the field was introduced). Version 2 begins at
# f0d0e88; clean commits before it are version 1; "+dirty" or unknown commits have no known version.
_V2_COMMITS = frozenset({
    "003a5d6a7eac", "0335d01f300e", "29defcb5ac6b", "2d0e6d73221e", "614c8fdd51a5", "7ffffa6e9d1d",
    "8fb8e62e2d6d", "9dc9fbd2c337", "a5e91f391ece", "acb63df5c011", "b6727291b5d7", "d592799c5aac",
    "e2d6e25ae17b", "e354ad8c66f8", "e60faae22ffc", "eee790396c19", "f0d0e88fc6b0", "ff7bd275e687"})
_V1_COMMITS = frozenset({
    "01420c2c5272", "0ad183290e71", "0be2528ef73f", "4dc4f34bca16", "55498a01594b", "557e7db9a917",
    "5bfcba38a94d", "5ef47259a12d", "7b58da444217", "8d426592ed0f", "bdcd421ca334", "c0ac42e4c11d",
    "e82e7aea0298", "edb8920a933a"})


def _legacy_numerics(commit: str | None) -> int | None:
    if not commit or commit.endswith("+dirty"):
        return None  # uncommitted code: what computed the numbers is not known
    short = commit[:12]
    return 2 if short in _V2_COMMITS else 1 if short in _V1_COMMITS else None


def migrate(manifest: dict, summary: dict | None = None) -> tuple[dict, dict]:
    """(manifest, summary) in today's schema. Old records gain:

    - config.np resolved to the world size, and the science key recomputed from the config;
    - wall_time_kind (and cluster_wall_time) from the recorded hosts and cores: "unknown" when the
      record predates cores_per_host, which is never a cluster time;
    - numerics_version from the git commit (see _legacy_numerics), and numerics_current;
    - config fields added later, at their defaults (the value those runs used); summary fields added
      later (the initialisation probe) as NaN;
    - eval_set "test"; collapsed and at_chance recomputed with today's one definition (metrics).
    """
    m, s = dict(manifest), dict(summary or {})
    world = m["world"]
    known = {f for f in RunConfig.__dataclass_fields__}
    cfg = {**RunConfig().to_dict(), **{k: v for k, v in m["config"].items() if k in known}}  # fields added later
    cfg["np"] = cfg.get("np") or world
    m["config"] = {**m["config"], **cfg}
    m["science_key"] = RunConfig(**cfg).science_key()
    if "other_cores" not in m:  # recorded since the load check; before it, a time's contention is unknown
        m["wall_time_kind"] = wall_time_kind(world, m["processes"], m.get("hosts"), m.get("cores_per_host"))
    m["cluster_wall_time"] = m["wall_time_kind"] == CLUSTER
    if "numerics_version" not in m:
        m["numerics_version"] = _legacy_numerics(m.get("git_commit"))
    m["numerics_current"] = numerics.is_current(m["numerics_version"], cfg.get("sync", "epoch-average"))
    if m["numerics_version"] == numerics.VERSION and m.get("numerics_sources", numerics.SOURCES_SHA) not in numerics.same_numbers():
        m["numerics_current"] = False  # made by numerics modules that differ from today's under the same version
    m.setdefault("eval_set", "test")
    if s:
        ev = s.setdefault("eval_set", m["eval_set"])
        for k in ("init_dead_conv10_frac", "init_dead_relu_frac"):  # before the initialisation probe
            s.setdefault(k, float("nan"))
        s["cluster_wall_time"] = m["cluster_wall_time"]
        if f"{ev}_loss" in s:
            s["collapsed"] = is_collapsed(s[f"{ev}_loss"])
            s["at_chance"] = is_at_chance(s[f"{ev}_acc"], s[f"{ev}_loss"])
    return m, s
