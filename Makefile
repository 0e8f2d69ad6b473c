# The two commands of the README, plus helpers. Each creates the environment if missing.
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed-stamp
SYSTEM_PATH := $(PATH)
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: repro test env bench clean-data

## repro: set up the environment if needed, then run the whole pipeline on the sample data
repro: $(STAMP)
	dvc repro
	python -m flows.summary

## test: set up the environment if needed, then run the test suite (what CI runs)
test: $(STAMP)
	python -m pytest -q

env: $(STAMP)

# pip takes torch 2.14.1 / torchvision 0.29.1 from this machine's disk; constraints.txt
# holds the whole resolved set so a fresh machine gets exactly what was tested.
# A .venv of another Python (a first try with the wrong one) is made again with $(PYTHON), found on
# the PATH make started with (not in that .venv), which must itself be 3.11.
IS_311 := -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'
$(STAMP): pyproject.toml constraints.txt
	@$(BIN)/python $(IS_311) 2>/dev/null || { \
	  PATH='$(SYSTEM_PATH)'; \
	  $(PYTHON) $(IS_311) || { echo "error: $(PYTHON) is $$($(PYTHON) -V 2>&1); this project needs 3.11:" \
	    "make $(or $(MAKECMDGOALS),repro) PYTHON=python3.11" >&2; exit 1; }; \
	  rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	@touch $@

## bench: the ingest+filter scaling benchmark (prints rates and peak memory)
bench: $(STAMP)
	python benchmarks/bench_ingest_filter.py
