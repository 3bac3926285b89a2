# `make demo` and `make test` each create .venv and install what they need.
# The CPU build of torch goes in first: a bare `torch` requirement would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: demo test lint venv clean

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch 2.13.0 CPU: from this machine's local wheel when there is one, else from PyTorch's CPU index
	$(PY) -m pip install -q torch==$(TORCH_VERSION) || \
	  $(PY) -m pip install -q torch==$(TORCH_VERSION) --index-url $(TORCH_INDEX)
	touch $@

# uv installs everything after torch: it resolves and unpacks the test extras' ~170 packages in
# seconds where pip took two minutes (CI's budget); pip keeps torch, whose local CPU wheel only pip finds
UV := $(VENV)/bin/uv
EDITABLE := $(UV) pip install -q --python $(PY) -e

$(UV): | $(VENV)/.torch
	$(PY) -m pip install -q uv

$(VENV)/.core: $(VENV)/.torch pyproject.toml | $(UV)
	$(EDITABLE) .
	touch $@

$(VENV)/.test: $(VENV)/.core
	$(EDITABLE) ".[test]"
	touch $@

venv: $(VENV)/.core

demo: $(VENV)/.core
	$(VENV)/bin/segpipe demo --out ./demo-out

lint: $(VENV)/.test
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	RAY_DATA_DISABLE_PROGRESS_BARS=1 $(PY) -m pytest -q --durations=15

clean:
	rm -rf $(VENV) demo-out .demo runs
