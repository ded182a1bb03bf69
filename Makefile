# ettin: every target bootstraps the virtualenv (.venv) itself.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ETTIN := $(BIN)/ettin
RECIPE ?= recipes/ettin-17m.yaml
DATA ?= data/sotu

.PHONY: install test test-slow test-gpu lint format demo prep-data train bench gpu-check wheelhouse gpu-standin clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==25.1.1 setuptools wheel
	$(BIN)/pip install -e '.[test,downstream,scale]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install ettin (editable) with the test and downstream extras

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

# `make gpu-check` runs the harness package src/ettin_gpu/ on a GPU machine's own python3 (its
# torch, no package index): it needs no .venv and no ettin install, only PYTHONPATH=src. The
# Composer part installs the wheels of `make wheelhouse` from .gpu/ (carry that folder).
GPU_PYTHON ?= python3
gpu-check:  ## prove the GPU path (backends, compiled throughput, 130 Composer steps + resume)
	PYTHONUNBUFFERED=1 PYTHONPATH=src $(GPU_PYTHON) -m ettin_gpu

# What the GPU machine cannot fetch: the wheels of the Composer part for its CPython 3.12 on
# x86_64 Linux, the tokenizer and a small prepared dataset. Every wheel is *downloaded for* 3.12
# (pure ones as py3-none-any, binaries as cp312/abi3): a wheel built here would be tagged for this
# machine's python (websockets came out cp311 and did not install). The one sdist-only package is
# pure Python and builds to py3-none-any. pip then checks that all of them install on 3.12.
GPU_WHEELS := mosaicml==0.32.1 mosaicml-streaming==0.13.0 mosaicml-cli==0.7.5 \
	torch-optimi==0.3.3 hydra-core==1.3.8 omegaconf==2.3.1 \
	transformers==4.57.6 huggingface-hub==0.36.2 torchmetrics==1.7.4 coolname==2.2.0 \
	importlib_metadata==8.9.0 catalogue==2.0.10 backoff==2.2.1 gql==3.5.3 graphql-core==3.2.6 \
	questionary==2.0.1 prompt_toolkit==3.0.36 ruamel.yaml==0.19.1 validators==0.36.0 \
	wcwidth==0.9.4 websockets==11.0.3 termcolor==3.3.0 argcomplete==3.7.2 arrow==1.4.0 \
	paramiko==3.5.1 opentelemetry-api==1.45.2 python-snappy==0.7.3 \
	tokenizers==0.22.2 cryptography==50.0.2 cffi==2.1.1 bcrypt==5.0.0 \
	PyNaCl==1.6.2 brotli==1.2.1 cramjam==2.14.0 zstd==1.5.6.1 zstandard==0.25.0
GPU_SDISTS := antlr4-python3-runtime==4.9.3
GPU_TAGS := --python-version 3.12 --implementation cp --abi cp312 \
	$(foreach p,manylinux_2_34 manylinux_2_28 manylinux_2_17 manylinux2014,--platform $(p)_x86_64)
wheelhouse: install  ## .gpu/: wheels, tokenizer and data for `make gpu-check` on an offline GPU
	rm -rf .gpu && mkdir -p .gpu/wheels
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: $(GPU_TAGS) -d .gpu/wheels $(GPU_WHEELS)
	$(BIN)/pip wheel --quiet --no-deps -w .gpu/wheels $(GPU_SDISTS)
	$(BIN)/pip install --quiet --dry-run --no-index --no-deps --only-binary=:all: $(GPU_TAGS) \
		--target .gpu/.tags-check .gpu/wheels/*.whl
	$(BIN)/python -c "from ettin.tokenizer import build_ettin_tokenizer as b; import shutil; shutil.copytree(b(), '.gpu/tokenizer')"
	$(ETTIN) prep data_prep/sotu.yaml --phases pretrain --out .gpu/data --quiet
	du -sh .gpu .gpu/*

# The GPU machine on this CPU: a fresh CPython 3.12 venv (.standin/) with the GPU image's torch
# 2.11 (PyPI's only Linux x86_64 build of it, the CUDA one; it runs on the CPU) and the few packages
# of that image the check imports, nothing of ettin's own installs. `.gpu/` goes in exactly as
# ettin_gpu installs it on the GPU (`pip install --no-index --no-deps --target`); then the
# check's CPU smoke run: backends and throughput at the test size, and the Composer part's
# 130 steps, kill -9 and resume.
STANDIN_PY ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3.12)
STANDIN := .standin
STANDIN_IMAGE := torch==2.11.0 torchvision==0.26.0 numpy==2.5.2 safetensors==0.8.0 \
	pillow==13.0.0 pyyaml==6.0.4 requests==2.34.2 tqdm==4.70.1 packaging==26.4 psutil==7.2.2 \
	py-cpuinfo==9.0.0 lightning-utilities==0.15.3 regex==2026.12.2 anyio==4.16.0 rich==15.0.0 \
	python-dateutil==4.0.0 xxhash==4.1.0 pyarrow==26.0.1 pytest==9.2.0
$(STANDIN)/.installed: Makefile
	rm -rf $(STANDIN) && $(STANDIN_PY) -m venv $(STANDIN)
	$(STANDIN)/bin/pip install --quiet $(STANDIN_IMAGE)
	touch $@
gpu-standin: wheelhouse $(STANDIN)/.installed  ## the GPU check on a CPU stand-in of the GPU machine
	rm -rf runs/standin
	PYTHONUNBUFFERED=1 PYTHONPATH=src $(STANDIN)/bin/python -m ettin_gpu --smoke \
		--bundle .gpu --work runs/standin --out runs/standin/gpu_check.md

clean:
	rm -rf runs/demo .pytest_cache .ruff_cache
