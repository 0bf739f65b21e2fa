# Everything runs inside .venv, created on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: install test test-slow demo style quality bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch/torchvision first, at the versions this machine has on disk (no multi-GB download).
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

test-slow: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m slow

demo: $(STAMP)
	$(PY) -m vlcot_grpo.demo

style: $(STAMP)
	$(VENV)/bin/ruff format src rewards tests benchmarks
	$(VENV)/bin/ruff check --fix src rewards tests benchmarks

quality: $(STAMP)
	$(VENV)/bin/ruff check src rewards tests benchmarks
	$(VENV)/bin/ruff format --check src rewards tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/degradation.py

clean:
	rm -rf outputs .cache .pytest_cache
