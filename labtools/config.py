"""RunConfig: the single source of every training parameter.

The CLI flags, the notebooks' parameters cells and each run's manifest are views of it.
Names follow the paper where it names a thing (batch_per_node, ranks_per_node, epochs, lr, cifar_dir).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field, fields

PREPROCESS = ("caffe", "unit", "standardize")
SYNCS = ("epoch-average", "local-sgd", "allreduce")
AVERAGE_IMPLS = ("gather-bcast", "allreduce")
OPT_STATE = ("keep", "average", "reset")
LR_SCALING = ("none", "linear", "sqrt")
LR_SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("adam", "sgd")
PLAIN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")  # a folder name, never a path


# Fields added after records existed: left out of science_key at their default, so the keys of
# earlier runs (which computed the same thing) stay valid and the results store keeps reusing them.
ADDED_LATER = {"lr_schedule": "constant", "val_split": 0}


class ConfigError(ValueError):
    """A user-caused configuration error; its message is one sentence meant for the user."""


def _opt(default, help, choices=None, flag=True):
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag})


@dataclass
class RunConfig:
    # --- the paper's protocol (§3.2.5) ---
    np: int | None = _opt(None, "world size N (logical ranks); default: the number of MPI processes")
    batch_per_node: int = _opt(24, "images per node per step (the paper: 24)")
    ranks_per_node: int = _opt(2, "ranks per node; batch per rank = batch_per_node / ranks_per_node")
    epochs: int = _opt(10, "training epochs")
    lr: float = _opt(5e-4, "learning rate (the paper names only this; the optimizer is Adam by default)")
    cifar_dir: str | None = _opt(None, "folder holding the cifar-10-batches-py files")
    seed: int = _opt(0, "random seed for weights, dropout and shuffling")
    # --- data ---
    preprocess: str = _opt("caffe", "input preprocessing: caffe (BGR, ImageNet means subtracted; trains), "
                           "unit (x/255) or standardize (per-channel mean/std)", PREPROCESS)
    shuffle: bool = _opt(False, "reshuffle inside each rank's shard every epoch (the paper: fixed order)")
    limit_train: int | None = _opt(None, "use only the first K training images (quick runs)")
    limit_test: int | None = _opt(None, "use only the first K test images (quick runs)")
    val_split: int = _opt(0, "hold out the last K training images as a validation set: excluded from every shard, "
                          "evaluated instead of the test set (model selection; the paper: 0)")
    # --- optimizer ---
    optimizer: str = _opt("adam", "optimizer: adam or sgd", OPTIMIZERS)
    momentum: float = _opt(0.9, "momentum for --optimizer sgd")
    lr_scaling: str = _opt("none", "scale lr with the global batch relative to one rank: none, linear, sqrt", LR_SCALING)
    warmup_epochs: float = _opt(0.0, "linear warmup from lr to the scaled lr over this many epochs")
    lr_schedule: str = _opt("constant", "after warmup: constant (the paper) or cosine decay to 0 at the last step",
                            LR_SCHEDULES)
    # --- synchronisation ---
    sync: str = _opt("epoch-average", "sync strategy: epoch-average (the paper), local-sgd, allreduce", SYNCS)
    sync_every: int = _opt(0, "local-sgd period H in steps (0: once per epoch)")
    average_impl: str = _opt("gather-bcast", "how weights are averaged: gather-bcast (the paper's §3.2.3) or allreduce",
                             AVERAGE_IMPLS)
    opt_state: str = _opt("keep", "optimizer state at a weight average: keep (per rank), average, reset", OPT_STATE)
    # --- model options ---
    final_relu: bool = _opt(True, "ReLU after conv10 (the paper's model)")
    conv10_init: str = _opt("keras", "conv10 init: keras (Glorot) or caffe (N(0, 0.01))", ("keras", "caffe"))
    padding: str = _opt("valid", "conv1 padding: valid or same", ("valid", "same"))
    dropout: float = _opt(0.5, "dropout rate before conv10")
    # --- execution and records ---
    threads: int = _opt(0, "TensorFlow threads per process (0: cores on this host / processes on this host)")
    eval_batch: int = _opt(500, "batch size for test-set evaluation")
    diagnostics: bool = _opt(True, "record dead-ReLU fractions, gradient norms and weight divergence")
    out: str = _opt("results/local", "results root folder (results/local is ignored by git; the committed records "
                   "are under results/)")
    experiment: str = _opt("default", "experiment name: runs go to OUT/EXPERIMENT/RUN_ID/")
    run_id: str | None = _opt(None, "run folder name (default: UTC time, config hash and seed)")
    save_weights: bool = _opt(False, "write the final synchronized weights to RUN_DIR/final_weights.npy")
    label: str = _opt("", "free-text label stored in the manifest (e.g. a profile name)")
    quiet: bool = _opt(False, "no per-epoch console lines")
    checkpoint: bool = _opt(True, "write RUN_DIR/checkpoint.npz after every epoch (what --resume continues from)")
    wait_limit: float = _opt(1800.0, "seconds a process may wait for its peers in one collective before the job "
                             "is ended as stuck (0: no limit)")
    inject_failure: str | None = _opt(None, "testing: RANK:EPOCH raises on that logical rank in that epoch; "
                                      "RANK:EPOCH:hang makes it stop answering")

    # ---------------------------------------------------------------- derived
    @property
    def batch_per_rank(self) -> int:
        return self.batch_per_node // self.ranks_per_node

    def validate(self) -> "RunConfig":
        """Raise ConfigError with one clear sentence for anything a user can get wrong."""
        for f in fields(self):
            ch = f.metadata.get("choices")
            v = getattr(self, f.name)
            if ch and v not in ch:
                raise ConfigError(f"--{_flag(f.name)} must be one of {', '.join(ch)}; got {v!r}.")
        for name in ("batch_per_node", "ranks_per_node"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{_flag(name)} must be a positive integer; got {getattr(self, name)}.")
        if self.batch_per_node % self.ranks_per_node:
            raise ConfigError(f"--batch-per-node {self.batch_per_node} is not divisible by --ranks-per-node "
                              f"{self.ranks_per_node}; every rank needs the same batch size.")
        if self.np is not None and self.np < 1:
            raise ConfigError(f"--np must be at least 1; got {self.np}.")
        if self.epochs < 1:
            raise ConfigError(f"--epochs must be at least 1; got {self.epochs}.")
        for name in ("lr", "momentum", "warmup_epochs", "dropout", "wait_limit"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"--{_flag(name)} must be a finite number; got {getattr(self, name)}.")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be positive; got {self.lr}.")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"--momentum must be in [0, 1); got {self.momentum}.")
        if self.eval_batch < 1:
            raise ConfigError(f"--eval-batch must be at least 1; got {self.eval_batch}.")
        for name in ("threads", "seed", "wait_limit", "sync_every", "warmup_epochs"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{_flag(name)} must not be negative; got {getattr(self, name)}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"--dropout must be in [0, 1); got {self.dropout}.")
        if self.sync == "local-sgd" and self.sync_every == 0:
            raise ConfigError("--sync local-sgd needs --sync-every H (steps between weight averages).")
        if self.val_split < 0:
            raise ConfigError(f"--val-split must not be negative; got {self.val_split}.")
        for name in ("limit_train", "limit_test"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"--{_flag(name)} must be at least 1; got {v}.")
        if self.inject_failure is not None:
            parts = self.inject_failure.split(":")
            if not (len(parts) in (2, 3) and all(p.isdigit() for p in parts[:2]) and parts[2:] in ([], ["hang"])):
                raise ConfigError(f"--inject-failure takes RANK:EPOCH or RANK:EPOCH:hang, e.g. 1:1; "
                                  f"got {self.inject_failure!r}.")
        for name in ("experiment", "run_id"):
            v = getattr(self, name)
            if v is not None and not PLAIN_NAME.fullmatch(v):
                raise ConfigError(f"--{_flag(name)} must be a plain folder name (letters, digits, '.', '_', '-'; "
                                  f"not starting with '.'); got {v!r}.")
        return self

    # ------------------------------------------------------------- views
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown RunConfig field(s): {', '.join(unknown)}.")
        return cls(**d)

    def replace(self, **kw) -> "RunConfig":
        return dataclasses.replace(self, **kw)

    @property
    def eval_set(self) -> str:
        """What the run evaluates each epoch: the held-out validation split, or the test set."""
        return "val" if self.val_split else "test"

    def science_key(self, world: int | None = None) -> str:
        """Hash of the fields that change what is computed (not where records go or how loud).

        np is resolved to the world size first (``world`` when np is None): `--np 2` and no --np on
        two processes are the same computation and must share a key.
        """
        np_ = self.np if self.np is not None else world
        if np_ is None:
            raise ValueError("science_key: np is None and no world size given")
        skip = {"out", "experiment", "run_id", "label", "quiet", "threads", "eval_batch", "cifar_dir",
                "checkpoint", "wait_limit"}
        d = {k: v for k, v in {**self.to_dict(), "np": np_}.items()
             if k not in skip and not (k in ADDED_LATER and v == ADDED_LATER[k])}
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]

    # ------------------------------------------------------------- CLI
    @classmethod
    def add_arguments(cls, p: argparse.ArgumentParser) -> dict:
        """Every field as a flag, in FLAG_GROUPS' argument groups (returned by title, so a command can add
        its own flags to one); TEST_HOOKS parse but are left out of --help."""
        groups = {title: p.add_argument_group(title) for title in FLAG_GROUPS}
        where = {name: title for title, names in FLAG_GROUPS.items() for name in names}
        for f in fields(cls):
            if f.name not in where and f.name not in TEST_HOOKS:
                raise KeyError(f"RunConfig.{f.name} is in no group of labtools.config.FLAG_GROUPS")
            g = groups[where[f.name]] if f.name in where else p
            flag = "--" + _flag(f.name)
            h = argparse.SUPPRESS if f.name in TEST_HOOKS else f.metadata["help"]
            if f.type in ("bool", bool):
                g.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default, help=h)
            else:
                typ = {"int": int, "float": float, "str": str}.get(str(f.type).split(" |")[0], str)
                # choices are named in the help text (and in the error for a wrong one), not in the metavar
                meta = METAVARS.get(f.name, {int: "N", float: "X"}.get(typ, "NAME"))
                g.add_argument(flag, dest=f.name, type=typ, default=f.default, help=h, metavar=meta,
                               choices=f.metadata.get("choices"))
        return groups

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "RunConfig":
        return cls(**{f.name: getattr(ns, f.name) for f in fields(cls)})


# `labtools train --help`, group by group (RunConfig.add_arguments): every field in exactly one group,
# or a test hook. "run control" also takes the command's own flags (--resume, --no-keeper, --verbose).
FLAG_GROUPS = {
    "data": ("cifar_dir", "preprocess", "shuffle", "limit_train", "limit_test", "val_split"),
    "model": ("final_relu", "conv10_init", "padding", "dropout"),
    "optimisation": ("epochs", "batch_per_node", "ranks_per_node", "lr", "optimizer", "momentum", "lr_scaling",
                     "warmup_epochs", "lr_schedule", "seed"),
    "sync (N logical ranks on the MPI processes)": ("np", "sync", "sync_every", "average_impl", "opt_state"),
    "output": ("out", "experiment", "run_id", "label", "save_weights", "checkpoint", "diagnostics", "quiet"),
    "run control": ("threads", "eval_batch", "wait_limit"),
}
# Short value names in --help (else N for an integer, X for a number, NAME for text).
METAVARS = {"cifar_dir": "DIR", "out": "DIR", "limit_train": "K", "limit_test": "K", "val_split": "K",
            "sync_every": "H", "warmup_epochs": "EPOCHS", "wait_limit": "SECONDS", "epochs": "N", "lr": "LR"}
# Flags for the test suite only: they parse (and validate) as any other, --help leaves them out.
TEST_HOOKS = ("inject_failure",)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def steps_per_call() -> int:
    """Training steps per graph call (``$LABTOOLS_STEPS_PER_CALL``, default 16): a speed setting only,
    the numbers are the same for any value. Failure and signal checks run between calls, so a
    larger value answers them later (16 steps: about 0.1 s here)."""
    raw = os.environ.get("LABTOOLS_STEPS_PER_CALL", "16")
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"LABTOOLS_STEPS_PER_CALL must be a whole number of at least 1, not {raw!r}")
    return n


def sharded_adam() -> bool:
    """Shard the synchronous step's Adam over two processes (``$LABTOOLS_SHARDED_ADAM``, default on;
    0 turns it off): a speed setting only, the numbers are the same either way."""
    raw = os.environ.get("LABTOOLS_SHARDED_ADAM", "1")
    if raw not in ("0", "1"):
        raise ConfigError(f"LABTOOLS_SHARDED_ADAM must be 0 or 1, not {raw!r}")
    return raw == "1"
