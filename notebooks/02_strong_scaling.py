# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: -jupytext.text_representation
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · Strong scaling (the paper's Table 2, Figures 6–12)
#
# np ∈ {2, 4, …, 48}, 10 epochs, batch 12 per rank, Adam 5e-4, the paper's once-per-epoch weight
# average (gather to the root, average, broadcast), three seeds per np as the paper repeated each
# configuration. Where np exceeds the processes this machine can host, the run uses **logical ranks**:
# P MPI processes each host N/P ranks with their own shard, weights and optimizer state, and compute
# the same numbers as N real ranks (tested). Accuracy pools every seed whatever P ran it; wall time,
# speedup and efficiency use only runs timed as a cluster would be, and the table says why a row has
# none. The code is `labtools/studies/strong_scaling.py`.

# %% tags=["parameters"]
profile = "quick"      # smoke | quick | paper (each study says what they mean: labtools/studies/)
out_dir = None         # tables and figures go here (default: figures/<profile>)
results_root = None    # the results store (default: results/local/; "../results": the committed records, read-only)
runner = "pool"        # "pool": ipyparallel MPI engines; "mpiexec": one mpiexec job per run
run_missing = True     # False: use only runs already in the store (a partial study, labelled as such)
cifar_dir = None       # CIFAR-10 folder (default: found as `labtools data where` finds it)
retime = False         # True: rerun timed runs that have no cluster-valid wall time
write_store = False    # True: train into a store marked read-only (the committed records)

# %%
import os
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from IPython.display import Markdown, display
from labtools.studies import StrongScalingStudy

study = StrongScalingStudy(profile, out_dir, results_root, runner, run_missing,
                           cifar_dir=cifar_dir, retime=retime, write_store=write_store)
runs = study.collect()

# %% [markdown]
# Table 2 (mean ± std over seeds), every run behind it, Figures 6–7 (each rank's log at np = 2 and 4,
# first seed) and Figures 8–12 against np with the paper's values overlaid.

# %%
tables = study.tables(runs)
figures = study.figures(runs, tables)
_ = study.publish(tables, figures)

# %%
display(Markdown(study.interpret(runs, tables)))
