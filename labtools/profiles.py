"""Reproduction profiles: how much of the paper's protocol each notebook runs.

- smoke: CI; a couple of minutes on a CIFAR-10 subset. Checks the machinery, not the science.
- quick: the README's main job; real CIFAR-10, every table and figure from real runs, in well
  under half an hour on a 2-core machine. Reduced (subset, fewer epochs): labelled as such.
- paper: the exact protocol of §3.2-3.3 (full data, 10 epochs, batch 24/node, lr 5e-4).

Each notebook's parameters cell names a profile; ``params(profile, notebook)`` gives the rest.
"""
from __future__ import annotations

PAPER_NPS = [2, 4, 8, 16, 24, 32, 40, 48]
BEST = "allreduce, sqrt lr, warmup 2, cosine, no final ReLU, no dropout"
# Notebook 03, part 2: named sync strategies (RunConfig overrides of the paper's protocol).
STRATEGIES = {
    "epoch-average (paper)": {"sync": "epoch-average"},
    "local-sgd H=8": {"sync": "local-sgd", "sync_every": 8},
    "allreduce": {"sync": "allreduce"},
    # The best labtools found for np = 48 (one-seed and three-seed search in results/explore-np48):
    # synchronous SGD, lr scaled by sqrt(N) over a 2-epoch linear warmup, then cosine decay to 0;
    # no ReLU between conv10 and the softmax; no dropout (10 epochs leave the model underfit).
    BEST: {"sync": "allreduce", "lr_scaling": "sqrt", "warmup_epochs": 2.0, "lr_schedule": "cosine",
           "final_relu": False, "dropout": 0.0},
}
# The selection study (notebook 04): candidates for np = 48, compared on a validation split only.
TUNED = {"lr_scaling": "sqrt", "warmup_epochs": 2.0, "lr_schedule": "cosine"}
SELECTION_CANDIDATES = {
    "epoch-average (paper)": STRATEGIES["epoch-average (paper)"],
    "local-sgd H=8": STRATEGIES["local-sgd H=8"],
    "allreduce": STRATEGIES["allreduce"],
    "allreduce, sqrt lr, warmup 2, cosine": {"sync": "allreduce", **TUNED},
    BEST: STRATEGIES[BEST],
}
# The RunConfig fields a strategy may set; any it leaves out must be at their defaults.
STRATEGY_FIELDS = ("sync", "sync_every", "lr_scaling", "warmup_epochs", "lr_schedule", "final_relu", "dropout",
                   "opt_state", "conv10_init", "shuffle", "average_impl")


def _field(cfg: dict, name: str, default):
    """A config value; records older than a field (absent, or NaN in a loaded table) had its default."""
    v = cfg.get(name, default)
    return default if isinstance(v, float) and v != v else v


def strategy_of(cfg: dict, names) -> str | None:
    """Which named strategy a run's config is (None if none of names)."""
    from .config import RunConfig

    default = RunConfig()
    for k in names:
        want = STRATEGIES[k]
        if all(_field(cfg, f, getattr(default, f)) == want.get(f, getattr(default, f)) for f in STRATEGY_FIELDS):
            return k
    return None
PAPER_BATCHES = [8, 16, 24, 32]
# Notebook 03, part 1: the paper's configuration under each input and model option.
COLLAPSE_VARIANTS = {
    "caffe": {"preprocess": "caffe"},
    "unit": {"preprocess": "unit"},
    "standardize": {"preprocess": "standardize"},
    "unit, no final ReLU": {"preprocess": "unit", "final_relu": False},
    "unit, conv10 N(0,0.01)": {"preprocess": "unit", "conv10_init": "caffe"},
}
# Table 1's "fast sweep": avg epoch time / mean step = 200 steps per epoch at every batch size.
SWEEP_STEPS = 200

PROFILES = {
    "smoke": {
        "01_batch_sweep": dict(batches=PAPER_BATCHES, steps_per_epoch=10, epochs=2, limit_test=200, repeats=1),
        "02_strong_scaling": dict(nps=[2, 4], epochs=2, limit_train=480, limit_test=200, repeats=1, max_processes=2),
        "03_sync_strategies": dict(collapse_nps=[1, 2], collapse_seeds=[0], collapse_variants=["caffe", "unit"],
                                   nps=[2, 4], strategies=["epoch-average (paper)", BEST], seeds=[0], epochs=2,
                                   limit_train=480, limit_test=200, max_processes=2),
        "00_quickstart": dict(epochs=1, limit_train=480, limit_test=200),
    },
    "quick": {
        "01_batch_sweep": dict(batches=PAPER_BATCHES, steps_per_epoch=SWEEP_STEPS, epochs=2, limit_test=1000, repeats=1),
        "02_strong_scaling": dict(nps=PAPER_NPS, epochs=3, limit_train=10_000, limit_test=2000, repeats=1, max_processes=2),
        "03_sync_strategies": dict(collapse_nps=[1, 2], collapse_seeds=[0], collapse_variants=list(COLLAPSE_VARIANTS),
                                   nps=[2, 8, 48], strategies=["epoch-average (paper)", "allreduce", BEST], seeds=[0], epochs=3,
                                   limit_train=10_000, limit_test=2000, max_processes=2),
        "00_quickstart": dict(epochs=1, limit_train=2400, limit_test=1000),
    },
    "paper": {
        "01_batch_sweep": dict(batches=PAPER_BATCHES, steps_per_epoch=SWEEP_STEPS, epochs=3, limit_test=None, repeats=1),
        "02_strong_scaling": dict(nps=PAPER_NPS, epochs=10, limit_train=None, limit_test=None, repeats=1, max_processes=16),
        "03_sync_strategies": dict(collapse_nps=[1, 2], collapse_seeds=[0, 1, 2, 3, 4],
                                   collapse_variants=list(COLLAPSE_VARIANTS), nps=PAPER_NPS,
                                   strategies=list(STRATEGIES), seeds=[0, 1, 2], epochs=10,
                                   limit_train=None, limit_test=None, max_processes=2),
        "00_quickstart": dict(epochs=1, limit_train=None, limit_test=None),
    },
}


def params(profile: str, notebook: str) -> dict:
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    return dict(PROFILES[profile][notebook])


def processes_for(world: int, max_processes: int) -> int:
    """Largest P <= max_processes that divides N: real ranks up to the limit, logical beyond."""
    for p in range(min(world, max_processes), 0, -1):
        if world % p == 0:
            return p
    return 1
