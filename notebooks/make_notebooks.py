"""Writes the notebooks in this folder (clean, no outputs). Edit here, rerun, commit both.

    python notebooks/make_notebooks.py
"""
from pathlib import Path

import nbformat as nbf

HERE = Path(__file__).resolve().parent

PARAMS = '''profile = "quick"      # smoke | quick | paper (see labtools/profiles.py)
out_dir = None         # tables and figures go here (default: figures/<profile>)
results_root = None    # the results store (default: results/)
runner = "pool"        # "pool": ipyparallel MPI engines; "mpiexec": one mpiexec job per run
run_missing = True     # False: use only runs already in the store (a partial study, labelled as such)'''

SETUP = '''import os
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from IPython.display import Markdown, display
from labtools import figures, results, tables
from labtools.experiments import Planned
from labtools.notebook import Context
from labtools.profiles import processes_for
'''


def nb(cells):
    book = nbf.v4.new_notebook()
    book.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                     "language_info": {"name": "python"}}
    out = []
    for kind, src in cells:
        if kind == "md":
            out.append(nbf.v4.new_markdown_cell(src))
        else:
            c = nbf.v4.new_code_cell(src)
            if kind == "params":
                c.metadata["tags"] = ["parameters"]
            out.append(c)
    for i, c in enumerate(out):
        c["id"] = f"c{i:02d}"  # stable ids: regenerating gives no diff noise
    book.cells = out
    return book


QUICKSTART = [
    ("md", "# 00 · Quickstart: an MPI engine pool and one short training run\n\n"
           "Starts two ipyparallel engines that are the two ranks of one MPI job, shows them with `%%px`, "
           "trains SqueezeNet v1.1 on CIFAR-10 for one short epoch with the paper's settings "
           "(batch 24 per node, 2 ranks per node, Adam 5e-4), plots each rank's log and stops the pool."),
    ("params", PARAMS),
    ("code", SETUP + '''from labtools.cluster import Pool

ctx = Context(profile, "00_quickstart", out_dir, results_root, runner, run_missing)
p = ctx.params
pool = Pool(n=2).start()
pool.view.activate()   # enables %%px on the engines
pool.ranks             # engine id -> MPI rank'''),
    ("code", '''%%px
from mpi4py import MPI
print(f"MPI rank {MPI.COMM_WORLD.Get_rank()} of {MPI.COMM_WORLD.Get_size()} on {MPI.Get_processor_name()}")'''),
    ("code", '''cfg = ctx.base_config("quickstart", np=2)
summary = pool.run(cfg)      # labtools.train.run on both engines; their log lines stream here
pool.stop()
{k: summary[k] for k in ("world", "processes", "test_acc", "test_loss", "global_wall_s")}'''),
    ("code", '''rk = results.load_rank_epochs(summary["run_dir"])
fig = figures.fig_rank_epoch_log(rk, 2)
ctx.save_figure(fig, "quickstart_rank_log", run_ids=[os.path.basename(summary["run_dir"])])
rk'''),
    ("code", '''display(Markdown(f"Two ranks trained {int(rk.samples.sum())} images in {summary['global_wall_s']:.1f} s; "
                 f"the averaged model scores {100 * summary['test_acc']:.1f}% on {p['limit_test'] or 10000} test images."))'''),
]

BATCH_SWEEP = [
    ("md", "# 01 · Batch-size sweep (the paper's Table 1, Figures 4–5)\n\n"
           "Batch per node ∈ {8, 16, 24, 32}, two ranks on one node. Like the paper's fast sweep, every epoch is "
           "a fixed number of steps (the paper's Table 1 implies 200: average epoch time / mean step = 200), so "
           "epoch times compare the cost of a step at each batch size. Reported: average epoch time, mean step time, "
           "global throughput, peak RSS per process and average process CPU %. The paper's values are from a "
           "Raspberry Pi 4 (Cortex-A72); ours are from whatever machine runs this notebook."),
    ("params", PARAMS),
    ("code", SETUP + '''ctx = Context(profile, "01_batch_sweep", out_dir, results_root, runner, run_missing)
p = ctx.params
plan = [Planned(ctx.base_config("batch-sweep", np=2, batch_per_node=b, ranks_per_node=2, epochs=p["epochs"],
                                limit_train=p["steps_per_epoch"] * b, limit_test=p["limit_test"],
                                diagnostics=False, seed=s), 2)
        for b in p["batches"] for s in range(p["repeats"])]
runs = ctx.ensure(plan, "batch sweep")'''),
    ("code", '''t1 = tables.table1_batch_sweep(runs, tables.load_rank_epochs_by_run(runs))
ctx.save_table(t1, "table1_batch_sweep")
tables.display_frame(t1)'''),
    ("code", '''fig = figures.fig_batch_sweep(t1)
ctx.save_figure(fig, "fig04_05_batch_sweep", run_ids=t1.attrs["run_ids"])'''),
    ("code", '''best = t1.loc[t1.global_img_per_s_mean.idxmax()]
display(Markdown(
    f"On this machine the highest global throughput is at batch {int(best.batch_per_node)}/node "
    f"({best.global_img_per_s_mean:.0f} img/s); the paper found its optimum at 24/node on a Raspberry Pi 4. "
    f"Peak RSS per process ranges {t1.peak_rss_mb_mean.min():.0f}–{t1.peak_rss_mb_mean.max():.0f} MB "
    f"(TensorFlow itself is most of it)." + ctx.title_note()))'''),
]

SCALING = [
    ("md", "# 02 · Strong scaling (the paper's Table 2, Figures 6–12)\n\n"
           "np ∈ {2, 4, …, 48}, 10 epochs, batch 12 per rank, Adam 5e-4, the paper's once-per-epoch weight "
           "average (gather to the root, average, broadcast). Where np exceeds the processes this machine can "
           "host, the run uses **logical ranks**: P MPI processes each host N/P ranks with their own shard, "
           "weights and optimizer state (same numbers as N real ranks). Column P says which; wall times with "
           "P < N are not cluster times and are marked as such. Repeats use seeds 0, 1, …"),
    ("params", PARAMS),
    ("code", SETUP + '''ctx = Context(profile, "02_strong_scaling", out_dir, results_root, runner, run_missing)
p = ctx.params
plan = [Planned(ctx.base_config("scaling", np=n, seed=s), processes_for(n, p["max_processes"]))
        for n in p["nps"] for s in range(p["repeats"])]
runs = ctx.ensure(plan, "strong scaling")'''),
    ("code", '''t2 = tables.table2_scaling(runs, base_np=min(p["nps"]))
ctx.save_table(t2, "table2_strong_scaling")
tables.display_frame(t2)'''),
    ("md", "Figures 6–7: each rank's training log at np = 2 and np = 4 (first seed)."),
    ("code", '''for n, name in ((2, "fig06_rank_log_np2"), (4, "fig07_rank_log_np4")):
    sel = runs[(runs.world == n) & (runs.seed == 0)]
    if len(sel):
        r = sel.iloc[0]
        ctx.save_figure(figures.fig_rank_epoch_log(results.load_rank_epochs(r.run_dir), n), name, run_ids=[r.run_id])'''),
    ("md", "Figures 8–12 (and test accuracy): against np, mean ± std over repeats, the paper's values overlaid."),
    ("code", '''for fn, name in ((figures.fig_speedup, "fig08_speedup"), (figures.fig_efficiency, "fig09_efficiency"),
                 (figures.fig_train_accuracy, "fig10_train_accuracy"), (figures.fig_total_time, "fig11_total_time"),
                 (figures.fig_train_loss, "fig12_train_loss"), (figures.fig_test_accuracy, "fig_test_accuracy")):
    ctx.save_figure(fn(t2), name, run_ids=t2.attrs["run_ids"])'''),
    ("code", '''coll = t2[t2.collapsed > 0]
first = int(coll.np.min()) if len(coll) else None
cl = t2[t2.processes == t2.np]
display(Markdown(
    f"Test accuracy goes from {t2.test_acc_pct_mean.iloc[0]:.1f}% at np={int(t2.np.iloc[0])} to "
    f"{t2.test_acc_pct_mean.iloc[-1]:.1f}% at np={int(t2.np.iloc[-1])}. "
    + (f"Runs collapse to chance (test loss within 1e-3 of ln 10) from np={first} on. " if first else
       "No run collapsed to chance (test loss ln 10). ")
    + f"{len(cl)} of {len(t2)} rows are timed with one process per rank (cluster-like); the rest ran as logical "
      f"ranks on fewer processes, so their wall times measure this machine, not a cluster." + ctx.title_note()))'''),
]

SYNC = [
    ("md", "# 03 · Sync strategies that do not collapse, and the collapse explained\n\n"
           "Part 1 asks how often the paper's own configuration collapses (test loss = ln 10) at np = 1 and 2 "
           "across seeds, for each input preprocessing. Part 2 trains every np with each sync strategy "
           "(`epoch-average` = the paper's, `local-sgd`, `allreduce` = synchronous SGD) at the paper's budget "
           "(10 epochs, batch 12 per rank) and compares test accuracy, with the paper's values overlaid. "
           "Diagnostics (dead conv10 channels on a fixed probe batch, gradient norm, weight divergence between "
           "ranks before each average) explain what happens."),
    ("params", PARAMS),
    ("code", SETUP + '''import pandas as pd
ctx = Context(profile, "03_sync_strategies", out_dir, results_root, runner, run_missing)
p = ctx.params
from labtools.profiles import COLLAPSE_VARIANTS
collapse_plan = [Planned(ctx.base_config("collapse", np=n, ranks_per_node=min(n, 2), batch_per_node=12 * min(n, 2),
                                         seed=s, **COLLAPSE_VARIANTS[v]), n)
                 for n in p["collapse_nps"] for v in p["collapse_variants"] for s in p["collapse_seeds"]]
collapse = ctx.ensure(collapse_plan, "collapse frequency")'''),
    ("code", '''def variant(r):
    return next(k for k, v in COLLAPSE_VARIANTS.items()
                if all(getattr(r, f"cfg_{f}") == x for f, x in v.items())
                and r.cfg_final_relu == v.get("final_relu", True) and r.cfg_conv10_init == v.get("conv10_init", "keras"))

if len(collapse):
    if "init_dead_conv10_frac" not in collapse:  # records made before the init probe existed
        collapse["init_dead_conv10_frac"] = float("nan")
    collapse = collapse.assign(test_acc_pct=100 * collapse.test_acc, variant=[variant(r) for r in collapse.itertuples()],
                               dead_below_frac=[results.load_epochs(d).dead_relu_frac.iloc[-1] for d in collapse.run_dir])
    tc = (collapse.groupby(["world", "variant"])
          .agg(runs=("run_id", "count"), collapsed=("collapsed", "sum"), test_acc_pct_mean=("test_acc_pct", "mean"),
               test_acc_pct_std=("test_acc_pct", "std"), dead_conv10_frac_mean=("dead_conv10_frac", "mean"),
               dead_below_frac_mean=("dead_below_frac", "mean"), init_dead_conv10_frac_mean=("init_dead_conv10_frac", "mean"))
          .reset_index())
    tc.attrs["run_ids"] = sorted(collapse.run_id)
    ctx.save_table(tc, "table_collapse_frequency")
    ctx.save_figure(figures.fig_collapse_runs(collapse, variant), "fig_collapse_runs",
                    run_ids=sorted(collapse.run_id))
else:
    tc = None
    display(Markdown("No collapse run is in the results store yet, so there is no collapse table."))
tc'''),
    ("code", '''from labtools.profiles import STRATEGIES, strategy_of

plan = [Planned(ctx.base_config("sync", np=n, seed=s, **STRATEGIES[k]), processes_for(n, p["max_processes"]))
        for k in p["strategies"] for n in p["nps"] for s in p["seeds"]]
runs = ctx.ensure(plan, "sync strategies")
runs["strategy"] = [strategy_of({k[4:]: v for k, v in r.items() if k.startswith("cfg_")}, p["strategies"])
                   for _, r in runs.iterrows()]'''),
    ("code", '''ts = tables.strategy_table(runs, runs["strategy"])
ctx.save_table(ts, "table_sync_strategies")
tables.display_frame(ts)'''),
    ("code", '''# The paper's own sync next to the paper's Table 2: where it collapses here and where it does not.
paper_sync = "epoch-average (paper)"
ea = runs[runs.strategy == paper_sync]
tp = tables.strategy_vs_paper(tables.strategy_table(ea, ea["strategy"])) if len(ea) else None
if tp is not None:
    ctx.save_table(tp, "table_epoch_average_vs_paper")
    display(Markdown(f"`{paper_sync}` here (test accuracy mean ± std over seeds, collapsed runs) beside the paper's Table 2:"))
    display(tables.display_frame(tp))'''),
    ("code", '''ctx.save_figure(figures.fig_strategy_accuracy(ts), "fig_sync_accuracy_vs_np", run_ids=ts.attrs["run_ids"])
n_max = max(p["nps"])
big = runs[runs.world == n_max]
curves = {r.run_id: (r.strategy, results.load_epochs(r.run_dir)) for r in big.itertuples()}
ctx.save_figure(figures.fig_accuracy_vs_epoch(curves, n_max), f"fig_sync_accuracy_vs_epoch_np{n_max}",
                run_ids=sorted(curves))
ctx.save_figure(figures.fig_diagnostics(curves, n_max), f"fig_sync_diagnostics_np{n_max}", run_ids=sorted(curves))'''),
    ("code", '''def acc(k):
    r = ts[(ts.strategy == k) & (ts.np == n_max)]
    return float(r.test_acc_pct_mean.iloc[0]) if len(r) else float("nan")

coll = tc[tc.collapsed > 0] if tc is not None else []
lines = [f"At np={n_max}: " + "; ".join(f"{k} {acc(k):.1f}%" for k in p["strategies"]) + " test accuracy (mean over seeds)."]
if tc is None:
    lines.append("The collapse frequency part has no runs yet.")
elif len(coll):
    lines.append("Collapses at small np occurred for " + "; ".join(sorted(set(coll.variant)))
                 + f" (mean dead conv10 fraction {coll.dead_conv10_frac_mean.mean():.2f}), so collapse does not need small shards.")
    below = collapse.groupby("collapsed").dead_below_frac.mean()
    if len(below) == 2:
        lines.append(f"Below conv10, the collapsed runs ended with {below[True]:.2f} of their ReLU channels dead, "
                     f"the runs that trained with {below[False]:.2f}.")
    # Dead channels at initialisation differ by option (conv10 init), so compare outcomes within an option.
    known = collapse.dropna(subset=["init_dead_conv10_frac"])
    both = known.groupby("variant").filter(lambda g: g.collapsed.nunique() == 2)
    if len(both):
        init = both.groupby("collapsed").init_dead_conv10_frac.mean()
        lines.append(f"Within the options where some runs collapsed and others trained ({', '.join(sorted(set(both.variant)))}), "
                     f"the runs that collapsed started with {init[True]:.2f} of their conv10 channels dead on the probe "
                     f"batch, those that trained with {init[False]:.2f}.")
else:
    lines.append("No run at np = 1 or 2 collapsed with any preprocessing tried.")
if tp is not None:
    pct = lambda v: "not in the paper" if pd.isna(v) else f"{v:.1f}%"
    lines.append(f"`{paper_sync}` here against the paper's Table 2, mean test accuracy (collapsed/runs): "
                 + "; ".join(f"np={r.np}: {r.test_acc_pct_mean:.1f}% ({r.collapsed}/{r.n_runs}) vs {pct(r.paper_test_acc_pct)}"
                             for r in tp[tp.n_runs > 0].itertuples()) + ".")
display(Markdown(" ".join(lines) + ctx.title_note()))'''),
]


def main():
    for name, cells in (("00_quickstart", QUICKSTART), ("01_batch_sweep", BATCH_SWEEP),
                        ("02_strong_scaling", SCALING), ("03_sync_strategies", SYNC)):
        nbf.write(nb(cells), HERE / f"{name}.ipynb")
        print("wrote", name)


if __name__ == "__main__":
    main()
