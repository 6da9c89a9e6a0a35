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
# # 04 · A configuration for np = 48, chosen without the test set
#
# The paper's configuration collapses at np = 48. Which of the candidate configurations
# (`labtools.profiles.SELECTION_CANDIDATES`) should a user run instead? Each candidate trains on the
# training set minus a held-out validation split (the last images, excluded from every shard) with the
# selection seeds; a rule written in code (`labtools.studies.selection.choose`) picks the winner from
# validation accuracy alone; only then is the winner trained on the full training set with fresh seeds
# and reported on the test set. The code is `labtools/studies/selection.py`.

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
from labtools.studies import SelectionStudy

study = SelectionStudy(profile, out_dir, results_root, runner, run_missing,
                       cifar_dir=cifar_dir, retime=retime, write_store=write_store)
collected = study.collect()

# %%
tables = study.tables(collected)
figures = study.figures(collected, tables)
_ = study.publish(tables, figures)

# %%
display(Markdown(study.interpret(collected, tables)))
