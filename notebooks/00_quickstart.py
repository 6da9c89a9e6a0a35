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
# # 00 · Quickstart: an MPI engine pool and one short training run
#
# Starts two ipyparallel engines that are the two ranks of one MPI job, shows them with `%%px`,
# trains SqueezeNet v1.1 on a CIFAR-10 subset (batch 24 per node, 2 ranks per node) with the
# configuration notebook 04 recommends (synchronous SGD, sqrt-scaled Adam lr with warmup and cosine
# decay) for a short run, plots each rank's log and stops the pool.
#
# Every cell can be run again: a second `Pool(n=2).start()` reuses the running engines, and a kernel
# shutdown or restart stops the engines. The run is trained once: run again (or a second `make main`),
# the notebook shows the stored run; `rerun = True` trains a new one.

# %% tags=["parameters"]
profile = "quick"      # smoke | quick | paper (each study says what they mean: labtools/studies/)
out_dir = None         # tables and figures go here (default: figures/<profile>)
results_root = None    # the results store (default: results/local/; "../results": the committed records, read-only)
runner = "pool"        # "pool": ipyparallel MPI engines; "mpiexec": one mpiexec job per run
run_missing = True     # False: use only runs already in the store (a partial study, labelled as such)
cifar_dir = None       # CIFAR-10 folder (default: found as `labtools data where` finds it)
retime = False         # True: rerun timed runs that have no cluster-valid wall time
write_store = False    # True: train into a store marked read-only (the committed records)
rerun = False          # True: train the demo run again even when the results store holds it

# %%
import os
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from IPython.display import Markdown, display
from labtools.cluster import Pool
from labtools.studies import QuickstartStudy

study = QuickstartStudy(profile, out_dir, results_root, runner, run_missing,
                        cifar_dir=cifar_dir, retime=retime, write_store=write_store, rerun=rerun)
config = study.training_config()  # CIFAR-10 found before any engine starts (None: the store has this run)
pool = Pool(n=2).start()   # run again: reuses the running pool
pool.activate()            # %%px runs on the engines
pool.ranks                 # engine id -> MPI rank

# %%
# %%px
from mpi4py import MPI
print(f"MPI rank {MPI.COMM_WORLD.Get_rank()} of {MPI.COMM_WORLD.Get_size()} on {MPI.Get_processor_name()}")

# %%
# labtools.train.run on both engines: a bar over the epochs, and each rank's log lines as they come
summary = study.train(pool, config)
display(study.summary_frame(summary))

# %%
figures = study.figures(summary, {})
_ = study.publish({}, figures)
display(Markdown(study.interpret(summary, {})))

# %%
pool.stop()   # the engines end here (a kernel shutdown or restart stops them too)
