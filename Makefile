# mergelab: `make demo` runs the embedded study, `make test` runs every test.
# Both create (or refresh, when pyproject.toml changed) the virtual env in .venv with pip.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 90
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DASK_LOGGING__DISTRIBUTED ?= warning
export MPLBACKEND ?= Agg

.PHONY: demo test env clean

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mergelab demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf data/store data/demo data/reports .pytest_cache .hypothesis
