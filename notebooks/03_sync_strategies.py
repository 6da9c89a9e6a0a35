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
# # 03 · Sync strategies that do not collapse, and the collapse explained
#
# Part 1 asks how often the paper's own configuration collapses (test loss = ln 10) or ends at chance
# at np = 1 and 2 across seeds, for each input preprocessing and model option. Part 2 trains every np
# with each sync strategy (`epoch-average` = the paper's, `local-sgd`, `allreduce` = synchronous
# SGD, and a tuned allreduce) at the paper's budget (10 epochs, batch 12 per rank) and compares test
# accuracy, with the paper's values overlaid. Diagnostics (dead conv10 channels on a fixed probe batch,
# gradient norm, weight divergence between ranks before each average) explain what happens. Which
# configuration to use at np = 48 is chosen on validation data in notebook 04, not here.
# The code is `labtools/studies/sync_strategies.py`.

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
from labtools.studies import SyncStrategiesStudy

study = SyncStrategiesStudy(profile, out_dir, results_root, runner, run_missing,
                            cifar_dir=cifar_dir, retime=retime, write_store=write_store)
collected = study.collect()

# %%
tables = study.tables(collected)
figures = study.figures(collected, tables)
_ = study.publish(tables, figures)

# %%
display(Markdown(study.interpret(collected, tables)))
