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
# # 01 · Batch-size sweep (the paper's Table 1, Figures 4–5)
#
# Batch per node ∈ {8, 16, 24, 32}, two ranks on one node. Like the paper's fast sweep, every epoch is
# a fixed number of steps (the paper's Table 1 implies 200: average epoch time / mean step = 200), so
# epoch times compare the cost of a step at each batch size. Every run is a timing: only runs with one
# process per rank, no more processes than cores and no other load on the machine count
# (`labtools.records.wall_time_kind`). The paper's values are from a Raspberry Pi 4 (Cortex-A72);
# ours are from whatever machine runs this notebook. The code is `labtools/studies/batch_sweep.py`.

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
from labtools.studies import BatchSweepStudy

study = BatchSweepStudy(profile, out_dir, results_root, runner, run_missing,
                        cifar_dir=cifar_dir, retime=retime, write_store=write_store)
runs = study.collect()

# %% [markdown]
# Table 1 (mean ± std over seeds, definitions under the table), every run separately, and Figures 4–5.

# %%
tables = study.tables(runs)
figures = study.figures(runs, tables)
_ = study.publish(tables, figures)

# %%
display(Markdown(study.interpret(runs, tables)))
