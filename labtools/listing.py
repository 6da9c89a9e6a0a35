"""`labtools runs`: what have I run? One row per run folder of the results store, newest first,
under its experiment, in 100 columns; `--long` and `labtools runs RUN_ID` say the rest in words.

Everything is read through what already owns it: results.run_dirs / results.read_record (the
manifest and summary, migrated to today's schema), record.status (completed, failed,
interrupted, running, or died: running on disk but its heartbeat stopped) and the named
strategies of labtools.profiles. Runs that did not complete are listed too, with how they ended.
A config that is no named strategy shows the nearest one and a mark, [a], whose note says how it
differs: two rows that look the same compute the same thing.
"""
from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path

COLUMNS = ["run", "np", "P", "strategy", "seed", "epochs", "result", "wall", "ago"]
RIGHT = {"np", "P", "seed", "epochs", "wall"}
NEWEST = 20  # rows shown without --all
WIDTH = 100  # the terminal the table and its notes fit
# Fields that are columns already, or that change where a run is written or how it is watched, not what it
# computes (RunConfig.science_key leaves the latter out too).
NOT_A_VARIANT = {"np", "seed", "epochs", "out", "experiment", "run_id", "label", "quiet", "threads", "eval_batch",
                 "cifar_dir", "checkpoint", "wait_limit", "save_weights", "inject_failure"}
# How a config field reads in a variant note ("preprocess unit", "no final ReLU").
FIELD_WORDS = {"batch_per_node": "batch/node", "ranks_per_node": "ranks/node", "limit_train": "train images",
               "limit_test": "test images", "val_split": "validation images", "conv10_init": "conv10 init",
               "final_relu": "final ReLU", "lr_scaling": "lr scaling", "warmup_epochs": "warmup epochs",
               "lr_schedule": "lr schedule", "sync_every": "sync every", "average_impl": "average by",
               "opt_state": "optimizer state", "shuffle": "reshuffling"}


class ListingError(ValueError):
    """A results folder, experiment or run that is not there; one sentence for the user."""


def variant(cfg: dict) -> tuple[str | None, list[str]]:
    """(the named strategy a config is or is nearest to, how the config differs from that strategy's
    config: one phrase per field, in RunConfig's order)."""
    from dataclasses import fields

    from .config import RunConfig
    from .profiles import SELECTION_CANDIDATES, STRATEGIES, nearest_strategy

    name = nearest_strategy(cfg)
    ref = {**RunConfig().to_dict(), **({**SELECTION_CANDIDATES, **STRATEGIES}[name] if name else {})}
    out = []
    for f in fields(RunConfig):
        k = f.name
        if k in NOT_A_VARIANT or k not in cfg or cfg[k] == ref[k]:
            continue
        v, word = cfg[k], FIELD_WORDS.get(k, k.replace("_", " "))
        if isinstance(v, bool):
            out.append(word if v else f"no {word}")
        else:
            out.append(f"{word} {v:g}" if isinstance(v, float) else f"{word} {'all' if v is None else v}")
    return name, out


def short_name(name: str | None, cfg: dict) -> str:
    from .profiles import SHORT_NAMES

    return SHORT_NAMES.get(name, name) if name else cfg.get("sync", "?")


def run_rows(root, experiment: str | None = None, now: _dt.datetime | None = None) -> list[dict]:
    """One dict per run folder under root (or root/experiment), newest first, with COLUMNS, its
    ``experiment``, ``status``, ``accuracy``, full ``strategy_name``, ``variant`` (how its config differs
    from that strategy's), ``run_dir``, ``config``, ``error`` and a sortable ``start_utc``. A folder whose
    record cannot be read is a row saying so."""
    from . import results
    from .record import COMPLETED, status

    now = now or _dt.datetime.now(_dt.timezone.utc)
    rows = []
    for d in results.run_dirs(root, experiment, completed=False, unreadable=True):
        row = {c: "" for c in COLUMNS} | {"run": d.name, "experiment": d.parent.name, "run_dir": d, "variant": [],
                                          "strategy_name": "", "config": {}, "error": "", "status": "", "accuracy": ""}
        try:
            m, s = results.read_record(d)
            st = status(d)
        except (OSError, ValueError, KeyError, TypeError) as e:
            rows.append(row | {"status": f"unreadable ({type(e).__name__})", "result": "unreadable", "start_utc": ""})
            continue
        cfg = m.get("config", {})
        name, diff = variant(cfg)
        done, total = m.get("epochs_done", 0), cfg.get("epochs", "?")
        eset = (s or {}).get("eval_set", m.get("eval_set", "test"))
        acc = (s or {}).get(f"{eset}_acc") if st == COMPLETED else None
        accuracy = "" if acc is None else f"{100 * acc:.2f}%" + ("" if eset == "test" else " val")
        row.update({
            "status": st, "np": m.get("world", ""), "P": m.get("processes", ""),
            "strategy": short_name(name, cfg), "strategy_name": name or cfg.get("sync", ""), "variant": diff,
            "seed": cfg.get("seed", ""),
            "epochs": str(total) if st == COMPLETED else f"{done}/{total}" + _resumable(d, m, done),
            "accuracy": accuracy, "result": accuracy or st,  # a completed run's accuracy, else how it ended
            "wall": "" if not s or s.get("global_wall_s") is None else duration(s["global_wall_s"]),
            "ago": age(m.get("start_utc"), now).removesuffix(" ago"),  # the column's name says it
            "start_utc": m.get("start_utc") or "", "config": cfg, "error": m.get("error") or "",
            "hosts": m.get("hosts") or [], "wall_time_kind": m.get("wall_time_kind", ""),
        })
        rows.append(row)
    # newest first: by start time, then by name (run ids start with their UTC start time)
    rows.sort(key=lambda r: (r["start_utc"], r["run"]), reverse=True)
    return rows


def _resumable(d: Path, m: dict, done: int) -> str:
    """Where a resume would continue when that is not after the last recorded epoch: the
    checkpoint holds fewer epochs (its write failed)."""
    if not (d / "checkpoint.npz").is_file():
        return ""
    k = (m.get("checkpoint") or {}).get("epochs_done")
    return f" (ckpt {k})" if k is not None and k != done else ""


def duration(seconds: float) -> str:
    """12.3s, 4m05s, 2h03m."""
    s = float(seconds)
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def age(start_utc: str | None, now: _dt.datetime) -> str:
    """How long ago an ISO-8601 UTC time was: "just now", "5 min ago", "3 h ago", "2 d ago"."""
    if not start_utc:
        return ""
    try:
        t = _dt.datetime.fromisoformat(start_utc)
    except ValueError:
        return ""
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.timezone.utc)
    s = (now - t).total_seconds()
    if s < 60:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{int(s // size)} {unit} ago"
    return ""  # unreachable


def _marks(rows: list[dict]) -> dict[tuple, str]:
    """A letter per distinct variant among the rows, in order of appearance: [a], [b], ..., [aa]."""
    marks = {}
    for r in rows:
        key = tuple(r["variant"])
        if key and key not in marks:
            n, tag = len(marks), ""
            while True:
                tag = chr(ord("a") + n % 26) + tag
                n = n // 26 - 1
                if n < 0:
                    break
            marks[key] = tag
    return marks


def table(rows: list[dict]) -> str:
    """The rows as a text table grouped by experiment (groups ordered by their newest run), then the
    notes: the full names of the short strategy names shown, and what each variant mark [x] means."""
    import textwrap

    marks = _marks(rows)
    cells = [{c: str(r[c]) for c in COLUMNS} | {"strategy": r["strategy"] + (f" [{marks[tuple(r['variant'])]}]"
                                                                             if r["variant"] else "")}
             for r in rows]
    width = {c: max([len(c)] + [len(x[c]) for x in cells]) for c in COLUMNS}

    def line(x):  # right-aligned numbers keep one space of their own padding: a gap of one is enough there
        return "".join((" " if i and c in RIGHT else "  " if i else "")
                       + (x[c].rjust(width[c]) if c in RIGHT else x[c].ljust(width[c]))
                       for i, c in enumerate(COLUMNS)).rstrip()

    out, groups = [line({c: c for c in COLUMNS})], {}
    for r, x in zip(rows, cells):
        groups.setdefault(r["experiment"], []).append(x)
    for exp, xs in groups.items():
        out.append(f"{exp}:")
        out += [line(x) for x in xs]
    notes = []
    names = {r["strategy"]: r["strategy_name"] for r in rows if r["strategy"] != r["strategy_name"]}
    if names:
        notes.append("strategies: " + "; ".join(f"{k} = {v}" for k, v in names.items()))
    notes += [f"[{tag}] " + ", ".join(v) for v, tag in marks.items()]
    for n in notes:
        out += textwrap.wrap(n, WIDTH, subsequent_indent="    ", break_on_hyphens=False)
    return "\n".join(out)


def details(r: dict, full: bool = False) -> str:
    """One run in words (`labtools runs --long`); full=True adds every config field (`labtools runs RUN_ID`)."""
    import textwrap

    from dataclasses import fields

    from .config import RunConfig

    def field(label, text):
        return textwrap.wrap(text, WIDTH, initial_indent=f"  {label:<10} ", subsequent_indent=" " * 13,
                             break_on_hyphens=False) if text else []

    if not r["config"]:
        return "\n".join([f"{r['run']}  ({r['experiment']})"] + field("status", r["status"])
                         + field("folder", os.path.relpath(r["run_dir"])))
    strategy = r["strategy_name"] + (f", shown as {r['strategy']}" if r["strategy"] != r["strategy_name"] else "")
    how = f"{r['status']}, epochs {r['epochs']}" + (f", {r['accuracy'].replace(' val', '')} "
                                                    f"{'validation' if 'val' in r['accuracy'] else 'test'} accuracy"
                                                    if r["accuracy"] else "")
    hosts = sorted(set(r.get("hosts") or []))
    lines = [f"{r['run']}  ({r['experiment']})"]
    lines += field("status", how + (f": {r['error']}" if r["error"] else ""))
    lines += field("strategy", strategy)
    lines += field("differs", ", ".join(r["variant"]) + " (from that strategy's config)" if r["variant"] else "")
    lines += field("ranks", f"np {r['np']} on {r['P']} processes" + (f", hosts {', '.join(hosts)}" if hosts else ""))
    lines += field("seed", str(r["seed"]))
    ago = r["ago"] + (" ago" if r["ago"] != "just now" else "")
    lines += field("time", ", ".join(x for x in (f"wall {r['wall']}" if r["wall"] else "",
                                                 r["wall_time_kind"] and f"timing: {r['wall_time_kind']}",
                                                 r["start_utc"] and f"started {r['start_utc']} ({ago})") if x))
    lines += field("folder", os.path.relpath(r["run_dir"]))
    if full:
        have = [p.name + ("/" if p.is_dir() else "") for p in sorted(Path(r["run_dir"]).iterdir())
                if not p.name.startswith(".")]  # the record's lock and heartbeat
        lines += field("files", ", ".join(have))
        lines.append("  config:")
        lines += [f"    {f.name:<16} {r['config'].get(f.name)!r}" for f in fields(RunConfig) if f.name in r["config"]]
    return "\n".join(lines)


def default_out() -> str:
    """Where `labtools train` writes runs unless --out says otherwise: RunConfig's own default."""
    from dataclasses import fields

    from .config import RunConfig

    return next(f.default for f in fields(RunConfig) if f.name == "out")


def no_runs(root) -> str:
    """The one sentence for a results folder without runs (missing or empty), with where runs are."""
    from . import results

    train = "`labtools train`" if str(root) == default_out() else f"`labtools train --out {root}`"
    where = f"No runs yet: {root} does not exist ({train} creates it)" if not Path(root).is_dir() else \
        f"No runs in {root} yet ({train} writes them there)"
    parent = Path(root).resolve().parent
    others = len(results.run_dirs(parent, completed=False, unreadable=True)) if parent != Path(root).resolve() else 0
    if others:
        where += f"; {others} runs are in {os.path.relpath(parent)} (`labtools runs --results {os.path.relpath(parent)}`)"
    return where + "."


def _store(root, experiment):
    """(root, experiment) checked, with an experiment's folder given as the root taken as such."""
    base = Path(root) / experiment if experiment else Path(root)
    if not Path(root).is_dir():
        raise ListingError(f"no results folder {root}.")
    if experiment and not base.is_dir():
        exps = sorted(p.name for p in Path(root).iterdir() if p.is_dir() and any(p.glob("*/manifest.json")))
        raise ListingError(f"no experiment {experiment!r} in {root}"
                           + (f"; its experiments: {', '.join(exps)}." if exps else "; it holds no runs yet."))
    if not experiment and not any(Path(root).glob("*/*/manifest.json")) and any(Path(root).glob("*/manifest.json")):
        root, experiment = Path(root).parent, Path(root).name  # an experiment's folder given as the root
    return root, experiment


def render(root, experiment: str | None = None, show_all: bool = False, now: _dt.datetime | None = None,
           long: bool = False) -> str:
    """What `labtools runs` prints (long: each run in words). ListingError for a folder or an experiment
    that is not there."""
    base = Path(root) / experiment if experiment else Path(root)
    root, experiment = _store(root, experiment)
    rows = run_rows(root, experiment, now)
    if not rows:
        return (f"No runs in {base} yet.\n" if experiment else no_runs(root) + "\n")
    shown = rows if show_all else rows[:NEWEST]
    out = ("\n\n".join(details(r) for r in shown) if long else table(shown)) + "\n"
    if len(shown) < len(rows):
        out += f"({len(shown)} newest of {len(rows)} runs; --all lists every one)\n"
    return out


def render_run(root, run: str, experiment: str | None = None, now: _dt.datetime | None = None) -> str:
    """`labtools runs RUN_ID`: one run's status, strategy, paths and whole config. RUN_ID is a run folder
    name (or its start, if only one run's starts so), EXPERIMENT/RUN_ID, or the run's folder."""
    if (Path(run) / "manifest.json").is_file():
        root, experiment, run = Path(run).resolve().parent.parent, Path(run).resolve().parent.name, Path(run).name
    elif "/" in run.strip("/"):
        experiment, run = run.strip("/").rsplit("/", 1)
    root, experiment = _store(root, experiment)
    rows = run_rows(root, experiment, now)
    hit = [r for r in rows if r["run"] == run] or [r for r in rows if r["run"].startswith(run)]
    if len(hit) != 1:
        where = f"{root}/{experiment}" if experiment else str(root)
        raise ListingError(f"no run {run!r} in {where} (`labtools runs --all` lists them)." if not hit else
                           f"{len(hit)} runs in {where} match {run!r}: "
                           + ", ".join(f"{r['experiment']}/{r['run']}" for r in hit[:5])
                           + (", ..." if len(hit) > 5 else "") + "; give more of the run id or EXPERIMENT/RUN_ID.")
    return details(hit[0], full=True) + "\n"
