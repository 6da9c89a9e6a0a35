# Two entry points (see README):  make main   and   make test
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PROFILE ?= quick
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: main figures test venv notebooks lab train-np2 bench check-arm

# The MPI: `mpich` (the PyPI wheel, default) or `site` (the machine's own MPI, loaded by mpi4py at run
# time; README "A site MPI"). The choice is remembered in the venv, so a later `make` never reinstalls
# the wheel over a site MPI: `make venv MPI=site` once, plain `make ...` afterwards.
MPI ?= $(shell cat $(VENV)/mpi-choice 2>/dev/null || echo mpich)
comma := ,
EXTRAS := notebooks,test$(if $(filter mpich,$(MPI)),$(comma)mpich)

venv: $(BIN)/.installed
$(BIN)/.installed: pyproject.toml
	@case "$(MPI)" in mpich|site) ;; *) echo "MPI must be mpich or site, not $(MPI)"; exit 2;; esac
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip
	$(BIN)/python -m pip install -q -e '.[$(EXTRAS)]'
	if [ "$(MPI)" = site ]; then $(BIN)/python -m pip uninstall -q -y mpich 2>/dev/null || true; fi
	echo $(MPI) > $(VENV)/mpi-choice
	touch $@

# notebooks/NAME.py is the tracked source; NAME.ipynb is made from it (and kept in step by jupytext in
# JupyterLab); the .ipynb is ignored by git, so running a notebook never changes a tracked file.
notebooks: venv
	$(BIN)/jupytext --sync --quiet notebooks/[0-9]*.py

# JupyterLab in notebooks/ (as root, Jupyter needs --allow-root; LAB_ARGS passes it and others).
lab: notebooks
	$(BIN)/jupyter lab --notebook-dir=notebooks $(LAB_ARGS)

# The main job: compute the profile's runs afresh into results/local/ (ignored by git; runs already
# there are reused, so a second `make main` trains nothing, on a busy machine too: a run timed beside other
# load is kept and drawn as "not a cluster time"; RETIME=1 reruns those), then re-execute the notebooks with
# papermill -> figures/$(PROFILE)/ (tables, figures, executed notebooks, REPORT.md).
main: notebooks
	$(BIN)/labtools reproduce --profile $(PROFILE) --results results/local $(if $(RETIME),--retime)

# Re-render the paper profile's committed tables and figures from the committed records (results/),
# training nothing: figures/paper/ changes only if a record, the code or a version changed.
figures: venv
	$(BIN)/labtools reproduce --profile paper --stored-only --results results

# The paper's np=2 protocol on real CIFAR-10 from the command line (about 5 minutes here).
train-np2: venv
	mpiexec -n 2 $(BIN)/labtools train --epochs 10 --experiment cli_np2

test: venv
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Every benchmark (an idle machine, about 25 minutes here); JSON under bench/results, table in the README.
bench: venv
	$(BIN)/python -m bench

# The wheel on an emulated arm64 Debian (debootstrap + qemu-user-static; root; about 20 minutes from
# scratch, cached afterwards): kernels built there, a tiny np=2 training -> bench/results/arm64.json.
check-arm: venv
	nice -n 5 bench/arm64/check.sh
