"""papermill executes every notebook with the smoke profile on real CIFAR-10 (the main job in a fresh
clone, conftest.fresh_main); the tables it writes must equal what the raw run records give when
recomputed here. A second main job (reuse, the same bytes) is tests/test_newcomer.py's."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from labtools import records, results, tables
from labtools.reproduce import reproduce
from labtools.studies import NOTEBOOKS

pytestmark = [pytest.mark.notebook, pytest.mark.mpi, pytest.mark.slow]


@pytest.fixture(scope="module")
def smoke(fresh_main, tmp_path_factory):
    """The smoke profile's main job as a newcomer runs it (conftest.fresh_main: a fresh clone, the data in its
    data/, no CIFAR10_DIR), seen as base/figures and base/results (its results/local)."""
    base = tmp_path_factory.mktemp("repro")
    (base / "figures").symlink_to(fresh_main.figures, target_is_directory=True)
    (base / "results").symlink_to(fresh_main.store, target_is_directory=True)
    return base


def test_every_notebook_executed(smoke):
    for n in NOTEBOOKS:
        nb = json.loads((smoke / "figures" / "smoke" / "executed" / f"{n}.ipynb").read_text())
        errors = [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, (n, errors)


EXPECTED_TABLES = ["table1_batch_sweep", "table1_batch_sweep_runs", "table2_strong_scaling", "table2_strong_scaling_runs",
                   "table_collapse_frequency", "table_sync_strategies", "table_epoch_average_vs_paper",
                   "table_selection_validation", "table_selection_test"]
EXPECTED_FIGURES = ["quickstart_rank_log", "fig04_05_batch_sweep", "fig06_rank_log_np2", "fig07_rank_log_np4",
                    "fig08_speedup", "fig09_efficiency", "fig10_train_accuracy", "fig11_total_time",
                    "fig12_train_loss", "fig_test_accuracy", "fig_sync_accuracy_vs_np", "fig_collapse_runs",
                    "fig_selection"]


def test_tables_and_figures_exist_with_provenance(smoke):
    out = smoke / "figures" / "smoke"
    for t in EXPECTED_TABLES:
        for ext in ("csv", "md", "tex", "provenance.json"):
            assert (out / "tables" / f"{t}.{ext}").is_file(), (t, ext)
        prov = json.loads((out / "tables" / f"{t}.provenance.json").read_text())
        assert prov["profile"] == "smoke" and prov["run_ids"] and "versions" in prov and prov["git_commit"] and "date_utc" not in prov
    for f in EXPECTED_FIGURES:
        for ext in ("png", "pdf", "provenance.json"):
            assert (out / "figures" / f"{f}.{ext}").is_file(), (f, ext)


def test_table2_equals_raw_records(smoke):
    t = pd.read_csv(smoke / "figures" / "smoke" / "tables" / "table2_strong_scaling.csv")
    runs = results.load_runs(smoke / "results", "scaling-smoke")
    assert sorted(t.np) == sorted(runs.world.unique())
    for row in t.itertuples():
        sel = runs[runs.world == row.np]
        assert row.n_runs == len(sel)
        assert row.test_acc_pct_mean == pytest.approx(100 * sel.test_acc.mean())
        assert row.mean_train_loss_mean == pytest.approx(sel.mean_train_loss.mean())
        timed = sel[sel.wall_time_kind == records.CLUSTER]
        assert row.n_timed == len(timed)
        assert row.wall_s_mean == pytest.approx((timed if len(timed) else sel).global_wall_s.mean())
        # each summary's numbers are themselves those of the run's epochs.csv
        for r in sel.itertuples():
            ep = results.load_epochs(r.run_dir)
            assert ep.test_acc.iloc[-1] == pytest.approx(r.test_acc)


def test_table1_equals_raw_records(smoke):
    t = pd.read_csv(smoke / "figures" / "smoke" / "tables" / "table1_batch_sweep.csv")
    runs = results.load_runs(smoke / "results", "batch-sweep-smoke")
    assert len(t) >= 1 and set(t.batch_per_node) == set(runs.cfg_batch_per_node)
    for row in t.itertuples():
        sel = runs[runs.cfg_batch_per_node == row.batch_per_node]
        # a row's cluster timings if it has any; else all its runs, labelled with why they are not a cluster's
        cluster = sel[sel.wall_time_kind == records.CLUSTER]
        sel = cluster if len(cluster) else sel
        assert row.wall_time_kind == "; ".join(sorted(set(sel.wall_time_kind))) and row.n_runs == len(sel)
        rk = pd.concat([results.load_rank_epochs(d) for d in sel.run_dir])
        assert row.peak_rss_mb_mean == pytest.approx(sel.run_dir.map(
            lambda d: results.load_rank_epochs(d).peak_rss_mb.max()).mean())  # peak over the whole run
        assert row.mean_step_s_mean == pytest.approx(sel.run_dir.map(
            lambda d: results.load_rank_epochs(d).mean_step_s.mean()).mean())
        assert row.global_img_per_s_mean == pytest.approx((row.batch_per_node / sel.run_dir.map(
            lambda d: results.load_rank_epochs(d).mean_step_s.mean())).mean())
        assert rk.epoch.min() == 1


def test_report_written(smoke):
    md = (smoke / "figures" / "smoke" / "REPORT.md").read_text()
    assert "# Does the paper hold up?" in md and "## Table 2" in md and "## Table 1" in md
    assert (smoke / "figures" / "smoke" / "REPORT.html").is_file()


def test_the_main_job_shows_no_kernel_log_lines(fresh_main):
    """The terminal of `make main` carries labtools' lines, not the notebook kernels' own log (e.g. "[IPKernelApp]
    ERROR | KeyboardInterrupt caught in kernel.", which the SIGINT of a kernel shutdown caused: see
    test_reproduce_live.test_papermill_shuts_kernels_down_without_a_sigint)."""
    said = fresh_main.first_out + fresh_main.first_err
    assert "[IPKernelApp]" not in said and "KeyboardInterrupt" not in said, said[-3000:]


def test_report_links_resolve_into_the_store_used(fresh_main):
    """Every link of the smoke REPORT resolves (run links into results/local/, the store `make main` used),
    and each seed's at-chance mark is what its record says (<= 11 % or an exact collapse)."""
    from report_check import report_problems

    out = fresh_main.figures / "smoke"
    assert report_problems(out) == []
    assert "](../../results/local/scaling-smoke/" in (out / "REPORT.md").read_text()


def test_notebooks_show_their_figures(smoke):
    nb = json.loads((smoke / "figures" / "smoke" / "executed" / "02_strong_scaling.ipynb").read_text())
    pngs = [o for c in nb["cells"] for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(pngs) >= 6


def test_stored_only_renders_a_partial_study_and_says_so(smoke, tmp_path):
    import shutil

    store = tmp_path / "results"
    shutil.copytree(smoke / "results", store)
    victim = results.run_dirs(store, "sync-smoke")[0]
    shutil.rmtree(victim)
    before = len(results.run_dirs(store))
    reproduce(profile="smoke", notebooks=["03_sync_strategies"], out=str(tmp_path / "figures"),
              results_root=str(store), run_missing=False)
    assert len(results.run_dirs(store)) == before  # nothing was run
    tdir = tmp_path / "figures" / "smoke" / "tables"
    prov = json.loads((tdir / "table_sync_strategies.provenance.json").read_text())
    assert prov["partial"] and prov["runs_missing"] == {"sync strategies": {"planned": 4, "missing": 1}}
    assert victim.name not in prov["run_ids"] and len(prov["run_ids"]) == 3
    # the collapse part lost nothing, so its table is complete
    assert not json.loads((tdir / "table_collapse_frequency.provenance.json").read_text())["partial"]
    t = pd.read_csv(tdir / "table_sync_strategies.csv")
    assert t.n_runs.sum() == 3
