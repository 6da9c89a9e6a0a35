"""Mechanics on small synthetic arrays: shards, config, data checks, preprocessing, model, dropout."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from labtools import data as D
from labtools.config import ConfigError, RunConfig


@pytest.mark.parametrize("n,world", [(50_000, 2), (50_000, 48), (50_000, 7), (10, 10), (97, 4)])
def test_shards_disjoint_complete_balanced(n, world):
    shards = [D.shard_indices(n, world, r) for r in range(world)]
    allidx = np.concatenate(shards)
    assert len(allidx) == n and len(np.unique(allidx)) == n  # disjoint and complete
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1  # balanced
    for r, s in enumerate(shards):
        assert np.all(s % world == r)  # the paper's i mod N = r


def test_shuffle_is_seeded_permutation_of_shard():
    s = D.shard_indices(1000, 4, 3)
    assert np.array_equal(D.epoch_order(s, 0, 0, 3, False), s)
    a, b = D.epoch_order(s, 1, 0, 3, True), D.epoch_order(s, 1, 0, 3, True)
    assert np.array_equal(a, b) and not np.array_equal(a, s)
    assert np.array_equal(np.sort(a), s)
    assert not np.array_equal(a, D.epoch_order(s, 2, 0, 3, True))


def test_dropout_keys_depend_on_sample_not_rank():
    idx = np.array([5, 17, 400])
    k = D.dropout_keys(idx, epoch=2, seed=1)
    assert np.array_equal(k[1:], D.dropout_keys(idx[1:], 2, 1))
    assert not np.array_equal(k, D.dropout_keys(idx, 3, 1))
    assert k.min() >= 0 and k.max() < 2**31


def test_preprocess_modes():
    x = np.zeros((2, 32, 32, 3), np.uint8)
    x[..., 0] = 255  # pure red
    caffe = D.preprocess(x, "caffe")
    assert np.allclose(caffe[0, 0, 0], [0 - 103.939, 0 - 116.779, 255 - 123.68])  # BGR, means off
    assert np.allclose(D.preprocess(x, "unit")[0, 0, 0], [1, 0, 0])
    st = D.preprocess(x, "standardize")[0, 0, 0]
    assert np.allclose(st, (np.array([255, 0, 0]) - D.CIFAR_RGB_MEAN) / D.CIFAR_RGB_STD)


@pytest.mark.parametrize("kw,needle", [
    ({"batch_per_node": 25, "ranks_per_node": 2}, "not divisible"),
    ({"epochs": 0}, "--epochs"),
    ({"lr": -1.0}, "--lr"),
    ({"sync": "gossip"}, "--sync"),
    ({"sync": "local-sgd"}, "--sync-every"),
    ({"np": 0}, "--np"),
    ({"inject_failure": "x"}, "RANK:EPOCH"),
])
def test_config_errors_are_one_sentence(kw, needle):
    with pytest.raises(ConfigError) as e:
        RunConfig(**kw).validate()
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_config_roundtrip_and_cli():
    import argparse

    c = RunConfig(np=16, epochs=3, sync="allreduce", shuffle=True)
    assert RunConfig.from_dict(c.to_dict()) == c
    p = argparse.ArgumentParser()
    RunConfig.add_arguments(p)
    ns = p.parse_args(["--np", "16", "--epochs", "3", "--sync", "allreduce", "--shuffle", "--lr", "1e-3"])
    c2 = RunConfig.from_args(ns)
    assert (c2.np, c2.epochs, c2.sync, c2.shuffle, c2.lr, c2.batch_per_rank) == (16, 3, "allreduce", True, 1e-3, 12)
    assert c2.science_key() != c.science_key()
    assert c.replace(out="elsewhere", label="x").science_key() == c.science_key()
    with pytest.raises(ConfigError):
        RunConfig.from_dict({"nope": 1})


def test_world_checks():
    from labtools.train import check_world

    assert check_world(RunConfig(), 2, 50_000) == 2
    assert check_world(RunConfig(np=48), 2, 50_000) == 48
    with pytest.raises(ConfigError, match="multiple"):
        check_world(RunConfig(np=5), 2, 50_000)
    with pytest.raises(ConfigError, match="larger than"):
        check_world(RunConfig(np=64), 2, 50)


# ------------------------------------------------------------------ data files

def _fake_dir(tmp_path: Path, cifar_src: str | None = None) -> Path:
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for f in D.MD5:
        if cifar_src:
            shutil.copy(Path(cifar_src) / f, d / f)
        else:
            (d / f).write_bytes(b"junk")
    return d


def test_missing_data_is_one_clear_sentence(tmp_path, monkeypatch):
    monkeypatch.delenv("CIFAR10_DIR", raising=False)
    with pytest.raises(D.DataError) as e:
        D.find_cifar_dir(tmp_path / "nowhere")
    assert "lacks" in str(e.value) and str(tmp_path / "nowhere") in str(e.value)


def test_altered_file_is_rejected(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    d = _fake_dir(tmp_path)
    with pytest.raises(D.DataError, match="md5"):
        D.verify(d)


def test_real_data_verifies_and_truncation_is_caught(cifar_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert D.verify(cifar_dir) == Path(cifar_dir).resolve()
    assert not (tmp_path / "cache" / "labtools" / "verified.json").exists()  # nothing remembered: checked every time
    d = _fake_dir(tmp_path, cifar_dir)
    with open(d / "test_batch", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(D.DataError, match="truncated or altered"):
        D.verify(d)


def test_load_real_cifar(cifar_dir):
    xtr, ytr, xte, yte = D.load_cifar10(cifar_dir)
    assert xtr.shape == (50_000, 32, 32, 3) and xtr.dtype == np.uint8 and xte.shape == (10_000, 32, 32, 3)
    assert list(ytr[:10]) == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]  # published first labels
    assert list(yte[:10]) == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert np.allclose(xtr.reshape(-1, 3).mean(0), D.CIFAR_RGB_MEAN, atol=0.01)


# ------------------------------------------------------------------ model

def test_model_shape_and_parameter_count():
    from labtools.model import squeezenet_v1_1

    m = squeezenet_v1_1()
    assert m.count_params() == 727_626
    assert [m.get_layer(n).output.shape[1] for n in ("conv1", "pool1", "pool3", "pool5")] == [15, 7, 3, 1]
    out = m(np.zeros((3, 32, 32, 3), np.float32))
    assert out.shape == (3, 10) and np.allclose(np.asarray(out).sum(1), 1, atol=1e-5)
    assert squeezenet_v1_1(final_relu=False).count_params() == 727_626


def test_keyed_dropout_mask_depends_only_on_key():
    from labtools.model import KeyedDropout

    layer = KeyedDropout(0.5)
    x = np.ones((4, 1, 1, 512), np.float32)
    keys = np.array([11, 22, 33, 44], np.int64)
    full = np.asarray(layer([x, keys], training=True))
    part = np.asarray(layer([x[2:], keys[2:]], training=True))
    assert np.array_equal(full[2:], part)  # same key, same mask, whatever the batch
    assert not np.array_equal(full[0], full[1])
    assert 0.4 < (full > 0).mean() < 0.6 and set(np.unique(full)) <= {0.0, 2.0}
    assert np.array_equal(np.asarray(layer([x, keys], training=False)), x)


def test_environment_yml_names_every_runtime_dependency_and_lets_pip_resolve_nothing():
    """Conda is not reachable here: the file is parsed, its packages are checked against pyproject's
    runtime dependencies (base, notebooks and mpich extras), and pip is left nothing to resolve."""
    import re
    import tomllib

    import yaml

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    deps = project["dependencies"] + extras["notebooks"] + extras["mpich"]
    names = {re.split(r"[<>=;! \[]", d, maxsplit=1)[0].lower() for d in deps}
    names = {"tensorflow" if n == "tensorflow-cpu" else n for n in names}
    env = yaml.safe_load((root / "environment.yml").read_text())
    assert env["channels"] == ["conda-forge"]
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    listed = {re.split(r"[<>=! ]", d, maxsplit=1)[0].lower() for d in conda}
    assert not names - listed, f"environment.yml lacks {names - listed}"
    # pip resolves nothing: no pip section (it would re-install PyPI's MPI and TensorFlow over conda's)
    assert all(isinstance(d, str) for d in env["dependencies"])
    assert "pip install --no-deps -e ." in (root / "environment.yml").read_text()


def test_processes_for_divides_world():
    from labtools.profiles import PAPER_NPS, processes_for

    assert [processes_for(n, 16) for n in PAPER_NPS] == [2, 4, 8, 16, 12, 16, 10, 16]
    assert [processes_for(n, 2) for n in PAPER_NPS] == [2] * 8
    assert processes_for(1, 16) == 1


def test_cli_args_reproduce_config():
    import argparse

    from labtools.experiments import cli_args

    c = RunConfig(np=48, sync="local-sgd", sync_every=8, shuffle=True, final_relu=False, limit_train=100)
    p = argparse.ArgumentParser()
    RunConfig.add_arguments(p)
    assert RunConfig.from_args(p.parse_args(cli_args(c))) == c


def test_strategy_of_names_each_strategy():
    from labtools.profiles import STRATEGIES, strategy_of

    for name, opts in STRATEGIES.items():
        cfg = RunConfig(**opts).to_dict()
        assert strategy_of(cfg, list(STRATEGIES)) == name
    assert strategy_of(RunConfig(sync="allreduce", dropout=0.1).to_dict(), list(STRATEGIES)) is None
    # a config older than lr_schedule (records.migrate fills it in when records are loaded)
    old = RunConfig(sync="allreduce").to_dict()
    del old["lr_schedule"]
    assert strategy_of(old, list(STRATEGIES)) == "allreduce"


def test_lr_schedule_warmup_scaling_and_cosine():
    from types import SimpleNamespace

    from labtools.worker import Worker

    def lr(epoch, step, **kw):
        cfg = RunConfig(epochs=10, lr=1e-3, **kw)
        return Worker.lr_at(SimpleNamespace(cfg=cfg, N=16, steps_per_epoch=100), epoch, step)

    assert lr(5, 0) == 1e-3  # the paper: constant
    assert lr(0, 0, lr_scaling="sqrt", warmup_epochs=2) == pytest.approx(1e-3)
    assert lr(1, 0, lr_scaling="sqrt", warmup_epochs=2) == pytest.approx(2.5e-3)  # halfway to 4e-3
    assert lr(2, 0, lr_scaling="linear", warmup_epochs=2) == pytest.approx(16e-3)
    cos = dict(lr_scaling="sqrt", warmup_epochs=2, lr_schedule="cosine")
    assert lr(2, 0, **cos) == pytest.approx(4e-3)  # the peak right after warmup
    assert lr(6, 0, **cos) == pytest.approx(2e-3)  # half way through the decay
    assert lr(9, 99, **cos) < 1e-6
    assert all(lr(e, 0, **cos) >= lr(e + 1, 0, **cos) for e in range(2, 9))


def test_synchronous_step_counts_every_ranks_samples():
    from types import SimpleNamespace

    from labtools.worker import Worker

    n, world, b = 97, 4, 12  # shards of 25, 24, 24, 24
    w = SimpleNamespace(all_shard_sizes=np.array([len(D.shard_indices(n, world, r)) for r in range(world)]), b=b)
    counts = [Worker.global_count(w, s) for s in range(3)]
    assert counts == [48, 48, 1] and sum(counts) == n


def test_new_fields_keep_old_science_keys():
    from labtools.config import ADDED_LATER

    cfg = RunConfig(np=2)
    assert cfg.replace(**{k: v for k, v in ADDED_LATER.items()}).science_key() == cfg.science_key()
    assert cfg.replace(lr_schedule="cosine").science_key() != cfg.science_key()


def test_thread_request_after_tf_started_is_not_silently_ignored():
    """TF's pools are fixed once it runs (conftest pins 1 thread): asking for another count warns."""
    import warnings

    from labtools.train import _set_threads

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _set_threads(1)  # what this process already has: nothing to say
    with pytest.warns(RuntimeWarning, match="fresh process"):
        _set_threads(2)


@pytest.mark.parametrize("raw", ["0", "-3", "many", "1.5"])
def test_steps_per_call_bad_value_is_one_sentence(raw, monkeypatch):
    from labtools.config import steps_per_call

    monkeypatch.setenv("LABTOOLS_STEPS_PER_CALL", raw)
    with pytest.raises(ConfigError, match=r"LABTOOLS_STEPS_PER_CALL must be a whole number of at least 1, not"):
        steps_per_call()
    monkeypatch.setenv("LABTOOLS_STEPS_PER_CALL", "7")
    assert steps_per_call() == 7


@pytest.mark.parametrize("raw", ["2", "yes", ""])
def test_sharded_adam_bad_value_is_one_sentence(raw, monkeypatch):
    from labtools.config import sharded_adam

    monkeypatch.setenv("LABTOOLS_SHARDED_ADAM", raw)
    with pytest.raises(ConfigError, match=r"LABTOOLS_SHARDED_ADAM must be 0 or 1, not"):
        sharded_adam()
    for raw, on in (("0", False), ("1", True)):
        monkeypatch.setenv("LABTOOLS_SHARDED_ADAM", raw)
        assert sharded_adam() is on
