# The two set-up commands of the README. Each creates .venv if it is missing.
#   make demo   install panda, then train and try the tiny demo recipe (CPU if no GPU)
#   make test   install panda with test extras, then run the CPU test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch keeps a laptop or CI install small; set TORCH_SPEC=torch for
# the default (CUDA) build, or install your own torch into .venv first.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.torch: $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	touch $@

install: $(VENV)/.torch
	$(BIN)/python -m pip install -q -e .

install-dev: $(VENV)/.torch
	$(BIN)/python -m pip install -q -e ".[dev]"

demo: install
	$(BIN)/panda recipe validate recipes/demo.toml
	$(BIN)/panda plugins

test: install-dev
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
