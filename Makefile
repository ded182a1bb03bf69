# ettin: every target bootstraps the virtualenv (.venv) itself.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ETTIN := $(BIN)/ettin
RECIPE ?= recipes/ettin-17m.yaml
DATA ?= data/sotu

.PHONY: install test test-slow test-gpu lint format demo prep-data train bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==25.1.1 setuptools wheel
	$(BIN)/pip install -e '.[test]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install ettin (editable) with the test extras

test: install  ## the default (CPU) test suite
	$(BIN)/python -m pytest

test-slow: install  ## the long tests too (demo end to end, full recipe chain)
	$(BIN)/python -m pytest -m "not gpu"

test-gpu: install  ## the GPU tests (needs CUDA and `pip install -e '.[gpu]'`)
	$(BIN)/python -m pytest -m gpu

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

format: install
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench

prep-data: install  ## tokenizer + bundled corpus -> MDS shards for all three phases in $(DATA)
	$(ETTIN) prep data_prep/sotu.yaml --out $(DATA)

demo: install  ## the whole pipeline on a tiny model, offline, in minutes
	$(ETTIN) demo

train: install  ## run a multi-stage recipe: make train RECIPE=recipes/ettin-150m.yaml
	$(ETTIN) recipe $(RECIPE)

bench: install  ## CPU benchmarks: ratios against named baselines
	$(BIN)/python bench/run_all.py

clean:
	rm -rf runs/demo .pytest_cache .ruff_cache
