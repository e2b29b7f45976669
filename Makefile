# mergelab: `make demo` runs the embedded study (`make papers` its companion studies), `make test` runs
# every test, `make lab` opens the notebooks in JupyterLab. Each creates (or refreshes, when
# pyproject.toml changed) the virtual env in .venv with pip.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# The store and study the notebooks draw (`make lab MERGELAB_STUDY=other`); a store path is made
# absolute, since JupyterLab starts kernels in notebooks/, while a URL (s3://, memory://) is kept.
MERGELAB_STORE ?= data/store
MERGELAB_STUDY ?= micro
LAB_STORE := $(if $(findstring ://,$(MERGELAB_STORE)),$(MERGELAB_STORE),$(abspath $(MERGELAB_STORE)))
# More `jupyter lab` options: `make lab LAB_ARGS="--no-browser --port 8890"`.
LAB_ARGS ?=
# Jupyter refuses to start as root ("Running as root is not recommended"), as in most containers: there
# `make lab` passes --allow-root and says so.
LAB_ROOT = $(if $(filter 0,$(shell id -u)),--allow-root)

export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 90
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DASK_LOGGING__DISTRIBUTED ?= warning
export MPLBACKEND ?= Agg

.PHONY: demo papers test lab env clean

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mergelab demo

# The companion studies of studies/papers/ (other settings of the micro benchmark) and the real-weights
# text study (studies/text.yaml: all-MiniLM-L6-v2 on data/text), into the demo's store.
papers: $(STAMP)
	for study in studies/papers/*.yaml studies/text.yaml; do $(BIN)/mergelab run $$study || exit 1; done

# Two pytest-xdist workers, each taking whole test files (their module fixtures run once): CI's 2 cores.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# The kernels import this checkout's mergelab (lib/) and mergelab_figures (analysis/); the inline backend
# draws the figures.
lab: $(STAMP)
	@$(if $(LAB_ROOT),echo "make lab: running as root (uid 0): passing --allow-root to jupyter lab")
	env -u MPLBACKEND MERGELAB_STORE='$(LAB_STORE)' MERGELAB_STUDY='$(MERGELAB_STUDY)' \
	    PYTHONPATH='$(CURDIR)/lib:$(CURDIR)/analysis' $(BIN)/jupyter lab --ServerApp.root_dir=notebooks $(LAB_ROOT) $(LAB_ARGS)

clean:
	rm -rf data/store data/demo data/reports .pytest_cache .hypothesis
