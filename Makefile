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

# The demo: a tiny Llama learns single-digit addition from scratch (about a minute on 2 CPU
# cores): accuracy before, training, accuracy after, then a few answers from the result.
demo: install
	$(BIN)/python recipes/demo_accuracy.py --recipe recipes/demo.toml --label "before training: "
	$(BIN)/panda train recipes/demo.toml --overwrite
	$(BIN)/python recipes/demo_accuracy.py --model runs/demo/final --label "after training: "
	$(BIN)/python recipes/demo_accuracy.py --model runs/demo/final --label "generated: " \
		--prompt "3+4=" --prompt "8+7=" --prompt "9+9="

test: install-dev
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
