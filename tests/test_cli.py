"""The terminal: every --help says its defaults and choices, usage errors are one line, `labtools runs`
answers "what have I run?", and TensorFlow's start-up noise is silenced unless --verbose."""
from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from conftest import REPO, run_mpi

from labtools import cli, listing, numerics
from labtools.config import RunConfig
from labtools.record import COMPLETED, FAILED, INTERRUPTED, RunRecord
from labtools.studies import NOTEBOOKS, PROFILES

COMMANDS = ("train", "runs", "data", "reproduce", "report")


def _commands() -> dict[str, argparse.ArgumentParser]:
    return cli.build_parser().commands


def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


# ---------------------------------------------------------------- --help

def test_top_level_help_names_every_command(capsys):
    out = _help([], capsys)
    for c in COMMANDS:
        assert re.search(rf"^\s+{c}\s+\S", out, re.M) or f"    {c}\n" in out, (c, out)


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_option_says_its_default_and_lists_its_choices(cmd, capsys):
    sub = _commands()[cmd]
    out = _help([cmd], capsys)
    flat = " ".join(out.split())  # the help as one line: wrapping may split any phrase
    fmt = sub._get_formatter()
    for a in sub._actions:
        if isinstance(a, argparse._HelpAction) or a.help == argparse.SUPPRESS:
            continue  # --help itself; a test hook (left out of --help: test_train_help_is_grouped...)
        assert a.help, f"{cmd} {a.option_strings or a.dest} has no help"
        text = fmt._get_help_string(a)
        takes_value = a.nargs != 0 or isinstance(a, argparse.BooleanOptionalAction)
        if a.option_strings and takes_value:
            assert "default" in text, f"`labtools {cmd} --help` says no default for {a.option_strings[0]}: {text!r}"
        for choice in a.choices or ():
            assert str(choice) in flat, f"`labtools {cmd} --help` does not list {choice!r} for {a.dest}"
    assert "(default: None)" not in flat and "(default: )" not in flat


def test_help_texts_that_the_issue_names(capsys):
    train = " ".join(_help(["train"], capsys).split())
    assert "--sync NAME sync strategy: epoch-average (the paper), local-sgd, allreduce" in train
    assert "(default: epoch-average)" in train
    assert "--shuffle, --no-shuffle" in train and "(default: --no-shuffle)" in train
    assert "--verbose" in train and "(default: 0.0005)" in train  # --lr's help says "by default" in words
    out = RunConfig().out
    assert f"(default: {out})" in train
    runs = " ".join(_help(["runs"], capsys).split())
    assert f"(default: {out})" in runs and "--all" in runs  # runs lists where train writes
    data = " ".join(_help(["data"], capsys).split())
    assert all(w in data for w in ("where:", "verify:", "download:", "$CIFAR10_DIR", "<project>/data",
                                   "never the current folder"))
    rep = " ".join(_help(["reproduce"], capsys).split())
    assert all(n in rep for n in NOTEBOOKS) and all(p in rep for p in PROFILES)
    assert "smoke (" in rep and "(default: quick)" in rep and "papermill" in rep
    report = " ".join(_help(["report"], capsys).split())
    assert "which profile's tables" in report and "(default: paper)" in report


def test_train_help_is_grouped_and_hides_test_hooks(capsys):
    from labtools.config import FLAG_GROUPS, TEST_HOOKS

    text = _help(["train"], capsys)
    titles = [line[:-1] for line in text.splitlines() if line and not line[0].isspace() and line.endswith(":")]
    assert titles == ["options", *FLAG_GROUPS], titles
    groups = dict(zip(titles, re.split(r"^\S.*:$", text, flags=re.M)[-len(titles):]))
    for title, names in FLAG_GROUPS.items():
        for name in names:
            assert f"--{name.replace('_', '-')}" in groups[title], (name, title)
    for flag in ("--resume", "--no-keeper", "--verbose"):
        assert flag in groups["run control"]
    assert "--inject-failure" not in text and "inject" not in text
    # every RunConfig field is a flag in exactly one group, or a test hook
    named = [n for ns in FLAG_GROUPS.values() for n in ns]
    assert sorted(named + list(TEST_HOOKS)) == sorted(f.name for f in fields(RunConfig))
    # --cifar-dir says where the search looks: anchored to the project, never the current folder
    flat = " ".join(groups["data"].split())
    assert "$CIFAR10_DIR, <project root>/data/cifar-10-batches-py (the labtools checkout, not the current folder" in flat
    assert "~/.keras/datasets/cifar-10-batches-py" in flat
    assert len(text.splitlines()) < 120  # 142 before the groups (usage listing every flag, long metavars)


def test_a_hidden_test_hook_still_parses_and_is_validated(capsys):
    ns = cli.build_parser().parse_args(["train", "--inject-failure", "1:2:hang", "--epochs", "3"])
    cfg = RunConfig.from_args(ns).validate()
    assert cfg.inject_failure == "1:2:hang" and cfg.epochs == 3
    ns = cli.build_parser().parse_args(["train", "--inject-failure", "x"])
    with pytest.raises(ValueError, match="--inject-failure takes RANK:EPOCH"):
        RunConfig.from_args(ns).validate()


# ---------------------------------------------------------------- usage errors

@pytest.mark.parametrize("argv", [
    [], ["bogus"], ["train", "--sync", "gossip"], ["train", "--epochs", "x"], ["runs", "--bogus"],
    ["reproduce", "--notebook", "99_none"], ["reproduce", "--profile", "huge"], ["data"], ["data", "fetch"],
])
def test_a_usage_error_is_one_line_naming_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    cmd = argv[0] if argv and argv[0] in COMMANDS else None
    assert f"(see `labtools{' ' + cmd if cmd else ''} --help`)" in err, err


# ---------------------------------------------------------------- labtools runs

def _ago(**kw) -> str:
    return (dt.datetime.now(dt.timezone.utc) - dt.timedelta(**kw)).isoformat(timespec="seconds")


def _record(out, experiment, run_id, cfg: RunConfig, start_utc: str) -> RunRecord:
    """A run folder as train.py makes it: created, started (manifest, status running)."""
    rec = RunRecord.create(out, experiment, run_id, run_id)
    rec.start({"config": cfg.to_dict(), "world": cfg.np, "processes": 2, "science_key": cfg.science_key(),
               "seed": cfg.seed, "numerics_version": numerics.VERSION, "numerics_sources": numerics.SOURCES_SHA,
               "start_utc": start_utc, "pids": [(socket.gethostname(), os.getpid())]})
    rec.stop_heartbeat()
    return rec


@pytest.fixture
def store(tmp_path):
    """Three runs: completed 3 h ago (allreduce, np 4), failed after 1 of 3 epochs 10 min ago (local-sgd
    H=8), interrupted 2 d ago (local-sgd H=16: no named strategy, so its sync field)."""
    a = _record(tmp_path, "sweep", "run-a", RunConfig(np=4, epochs=2, seed=1, sync="allreduce"), _ago(hours=3))
    a.write_manifest(epochs_done=2)
    a.complete({"world": 4, "processes": 2, "epochs": 2, "sync": "allreduce", "seed": 1, "batch_per_node": 24,
                "batch_per_rank": 12, "eval_set": "test", "test_acc": 0.4321, "test_loss": 1.5,
                "mean_train_loss": 1.6, "mean_train_acc": 0.4, "global_wall_s": 75.5})
    b = _record(tmp_path, "sweep", "run-b", RunConfig(np=2, epochs=3, sync="local-sgd", sync_every=8), _ago(minutes=10))
    b.write_manifest(epochs_done=1)
    b.mark(FAILED, "RankFailure: process 1 failed")
    c = _record(tmp_path, "other", "run-c", RunConfig(np=2, epochs=3, sync="local-sgd", sync_every=16), _ago(days=2))
    c.mark(INTERRUPTED, "interrupted by SIGTERM")
    return tmp_path


def _table(argv, capsys) -> tuple[list[str], list[str], str]:
    """(header, run rows, the whole output): experiment lines ("sweep:") and the notes under the table
    are not run rows."""
    assert cli.main(["runs", *argv]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    rows = [line for line in lines[1:] if line.startswith("run-")]
    return lines[0].split(), rows, out


def test_runs_lists_the_store_newest_first_with_its_columns(store, capsys):
    header, rows, out = _table(["--results", str(store)], capsys)
    assert header == ["run", "np", "P", "strategy", "seed", "epochs", "result", "wall", "ago"]
    assert [r.split()[0] for r in rows] == ["run-b", "run-a", "run-c"]  # newest first
    lines = out.splitlines()
    assert lines[1] == "sweep:" and lines[4] == "other:"  # grouped by experiment, the newest group first
    b, a, c = rows
    assert a.split()[:3] == ["run-a", "4", "2"]
    assert re.search(r"\ballreduce\s+1\s+2\s+43\.21%\s+1m15s\s+3 h$", a), a
    assert b.split()[:3] == ["run-b", "2", "2"]
    assert re.search(r"lsgd-H8\s+0\s+1/3\s+failed\s+10 min$", b), b  # no accuracy, no wall time
    # local-sgd H=16 is no named strategy: the nearest one, marked, and the mark says how it differs
    assert re.search(r"\blsgd-H8 \[a\]\s+0\s+0/3\s+interrupted\s+2 d$", c), c
    assert "[a] sync every 16" in lines and "strategies: lsgd-H8 = local-sgd H=8" in out
    # the columns line up: every row's result starts where the header's does
    col = lines[0].index("result")
    assert [r[col:].split()[0] for r in rows] == [FAILED, "43.21%", INTERRUPTED]


def test_runs_fit_100_columns_and_tell_different_configs_apart(capsys):
    """The committed store, every run: no line wider than 100 columns; two runs that look the same in the
    table (strategy and its mark, np, seed, epochs) compute the same thing (one science key)."""
    _, rows, out = _table(["--results", str(REPO / "results"), "--all"], capsys)
    wide = [line for line in out.splitlines() if len(line) > 100]
    assert not wide, wide[:3]
    look = {}
    for r in listing.run_rows(REPO / "results"):
        cfg = RunConfig(**{k: v for k, v in r["config"].items() if k in RunConfig.__dataclass_fields__})
        key = (r["strategy"], tuple(r["variant"]), r["np"], r["seed"], r["epochs"])  # a mark stands for its variant
        look.setdefault(key, set()).add(cfg.science_key(r["np"]))
    assert len(look) > 50 and all(len(v) == 1 for v in look.values()), [k for k, v in look.items() if len(v) > 1]


def test_runs_long_and_one_run_show_the_details(store, capsys):
    assert cli.main(["runs", "--results", str(store), "--long"]) == 0
    out = capsys.readouterr().out
    blocks = out.strip().split("\n\n")
    assert [b.split()[0] for b in blocks] == ["run-b", "run-a", "run-c"]
    b = " ".join(blocks[0].split())
    assert "status failed, epochs 1/3: RankFailure: process 1 failed" in b and "strategy local-sgd H=8" in b
    assert f"folder {os.path.relpath(store / 'sweep' / 'run-b')}" in b
    c = " ".join(blocks[2].split())
    assert "differs sync every 16" in c and "status interrupted" in c
    for argv in (["run-a"], ["sweep/run-a"], [str(store / "sweep" / "run-a")], ["run-a", "--experiment", "sweep"]):
        assert cli.main(["runs", "--results", str(store), *argv]) == 0, argv
        one = " ".join(capsys.readouterr().out.split())
        assert one.startswith("run-a (sweep) status completed, epochs 2, 43.21% test accuracy"), one
        assert "strategy allreduce" in one and "np 4 on 2 processes" in one and "wall 1m15s" in one
        assert "files manifest.json" in one and "summary.json" in one and "config: np 4 batch_per_node 24" in one
    assert cli.main(["runs", "--results", str(store), "run-"]) == 2  # three runs start so: which one?
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "3 runs in" in err and "give more of the run id" in err
    assert cli.main(["runs", "--results", str(store), "run-x"]) == 2
    assert capsys.readouterr().err == f"labtools: error: no run 'run-x' in {store} (`labtools runs --all` lists them).\n"


def test_runs_filters_an_experiment_and_shows_the_newest_unless_all(store, capsys, monkeypatch):
    _, rows, _ = _table(["--results", str(store), "--experiment", "other"], capsys)
    assert [r.split()[0] for r in rows] == ["run-c"]
    monkeypatch.setattr(listing, "NEWEST", 2)
    _, rows, out = _table(["--results", str(store)], capsys)
    assert [r.split()[0] for r in rows] == ["run-b", "run-a"]
    assert out.splitlines()[-1] == "(2 newest of 3 runs; --all lists every one)"
    _, rows, _ = _table(["--results", str(store), "--all"], capsys)
    assert len(rows) == 3


def test_runs_lists_a_running_and_an_unreadable_record(store, capsys):
    _record(store, "other", "run-d", RunConfig(np=2, epochs=5), _ago(seconds=5))  # this process: alive
    (store / "other" / "run-e").mkdir()
    (store / "other" / "run-e" / "manifest.json").write_text("{not json")
    _, rows, _ = _table(["--results", str(store), "--experiment", "other"], capsys)
    by = {r.split()[0]: r for r in rows}
    assert re.search(r"\bepoch-avg\s+0\s+0/5\s+running\s+just now$", by["run-d"]), by["run-d"]
    assert by["run-e"].split()[1] == "unreadable"
    assert cli.main(["runs", "--results", str(store), "--long", "--experiment", "other"]) == 0
    assert "status unreadable (JSONDecodeError)" in " ".join(capsys.readouterr().out.split())


def test_runs_on_an_empty_or_missing_store_is_one_sentence(tmp_path, capsys):
    assert cli.main(["runs", "--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"No runs in {tmp_path} yet") and len(out.splitlines()) == 1
    assert cli.main(["runs", "--results", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err == f"labtools: error: no results folder {tmp_path / 'none'}.\n"
    (tmp_path / "e" / "r").mkdir(parents=True)
    assert cli.main(["runs", "--results", str(tmp_path), "--experiment", "x"]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_runs_default_store_is_where_train_writes(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a fresh checkout: train's default folder does not exist yet
    assert cli.main(["runs"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"No runs yet: {RunConfig().out} does not exist") and len(out.splitlines()) == 1


def test_age_and_duration_read_as_a_person_says_them():
    now = dt.datetime(2026, 1, 2, 12, 0, tzinfo=dt.timezone.utc)
    assert listing.age("2026-01-02T11:59:30+00:00", now) == "just now"
    assert listing.age("2026-01-02T11:55:00+00:00", now) == "5 min ago"
    assert listing.age("2026-01-02T09:00:00+00:00", now) == "3 h ago"
    assert listing.age("2025-12-30T12:00:00+00:00", now) == "3 d ago"
    assert listing.age(None, now) == ""
    assert [listing.duration(s) for s in (2.76, 75.5, 4000)] == ["2.8s", "1m15s", "1h06m"]


# ---------------------------------------------------------------- TensorFlow's noise

# What TensorFlow prints at start-up, none of it from labtools: C++ log lines (absl's "I0000 00:00:..."
# prefix, oneDNN, the CPU feature guard, absl's "before InitializeLog"), and Python-side warnings.
NOISE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d|oneDNN|cpu_feature_guard|This TensorFlow binary|"
                   r"absl::InitializeLog|^WARNING:(absl|tensorflow)|TF_ENABLE_ONEDNN_OPTS|"
                   r"Warning: |rebuild TensorFlow", re.M)


def noise(text: str) -> list[str]:
    return [l for l in text.splitlines() if NOISE.search(l)]


@pytest.mark.mpi
@pytest.mark.slow
def test_tensorflow_noise_is_silenced_unless_verbose(cifar_dir, tmp_path):
    """A real `mpiexec -n 2 labtools train`, from an environment without TF_CPP_MIN_LOG_LEVEL (the test
    session sets it): both ranks' output holds no TensorFlow start-up line; --verbose brings them back."""
    args = ["train", "--epochs", "1", "--limit-train", "480", "--limit-test", "200", "--cifar-dir", cifar_dir,
            "--out", str(tmp_path)]
    r = run_mpi(2, [*args, "--experiment", "quiet"], unset=("TF_CPP_MIN_LOG_LEVEL",))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[Rank 0] Epoch 1/1" in r.stdout and "[Rank 1] Epoch 1/1" in r.stdout
    assert noise(r.stdout + r.stderr) == [], noise(r.stdout + r.stderr)
    assert r.stderr.strip() == "", r.stderr
    v = run_mpi(2, [*args, "--experiment", "loud", "--verbose"], unset=("TF_CPP_MIN_LOG_LEVEL",))
    assert v.returncode == 0, v.stderr[-3000:]
    assert len(noise(v.stdout + v.stderr)) >= 2, v.stderr[-3000:]  # at least one line per process


# ---------------------------------------------------------------- tests find data like the CLI; CI skips fail

def test_tests_find_cifar10_as_labtools_data_where_does(cifar_dir):
    from labtools.data import MD5, find_cifar_dir

    assert cifar_dir == str(find_cifar_dir(None, download=False).absolute())
    assert all((Path(cifar_dir) / f).is_file() for f in MD5)


PROBE = """
import pytest

def test_needs_data(cifar_dir):
    pass

@pytest.mark.slow
def test_slow_that_skips():
    pytest.skip("no compiler here")

def test_plain_skip():
    pytest.skip("not on this platform")

@pytest.mark.slow
@pytest.mark.xfail(reason="known")
def test_known_failure():
    assert False
"""


def _probe(tmp_path, **env) -> subprocess.CompletedProcess:
    """tests/conftest.py with a probe test file, in a folder of its own, run by pytest."""
    d = tmp_path / "probe"
    if not d.exists():
        (d / "tests").mkdir(parents=True)
        shutil.copy(REPO / "tests" / "conftest.py", d / "tests" / "conftest.py")
        (d / "tests" / "test_probe.py").write_text(PROBE)
        (d / "pytest.ini").write_text("[pytest]\nmarkers =\n    slow: probe\n")
    e = {k: v for k, v in os.environ.items() if k not in ("CI", "CIFAR10_DIR")}
    # no ~/.keras/datasets, no data/ under the probe's folder, and not the project's data/ either
    e.update(HOME=str(tmp_path), LABTOOLS_DATA_HOME=str(tmp_path / "no-data"), **env)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "tests"],
                          cwd=d, env=e, capture_output=True, text=True, timeout=300)


def test_in_ci_a_skip_for_missing_data_or_of_a_slow_test_is_a_failure(tmp_path):
    (tmp_path / "empty").mkdir()
    r = _probe(tmp_path, CIFAR10_DIR=str(tmp_path / "empty"))
    assert r.returncode == 0 and "3 skipped, 1 xfailed" in r.stdout, r.stdout[-3000:]
    r = _probe(tmp_path, CIFAR10_DIR=str(tmp_path / "empty"), CI="1")
    out = r.stdout
    assert r.returncode == 1 and "1 passed" not in out, out[-3000:]
    assert ("CI is set, so tests/test_probe.py::test_needs_data may not skip for missing data: CIFAR-10 is in "
            f"none of the folders searched ({tmp_path / 'empty'}, ") in out, out[-3000:]
    assert "set CIFAR10_DIR" in out
    assert ("CI is set, so tests/test_probe.py::test_slow_that_skips may not skip (marked slow): "
            "no compiler here") in out, out[-3000:]
    assert re.search(r"1 failed, 1 skipped, 1 xfailed, 1 error", out), out[-3000:]  # the data skip: at setup


def test_in_ci_a_data_test_passes_where_the_data_is(cifar_dir, tmp_path):
    r = _probe(tmp_path, CIFAR10_DIR=cifar_dir, CI="1")
    assert "PASSED tests/test_probe.py::test_needs_data" in r.stdout, r.stdout[-3000:]
