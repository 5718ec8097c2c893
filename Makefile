# The README's two commands: `make demo` and `make test`. Both create or reuse .venv, install what is
# missing, and say nothing about setup when nothing changed.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Machines without CUDA take the CPU build of torch (an unpinned torch pulls a multi-GB CUDA build).
TORCH_CPU := torch==2.13.0
TORCH_CUDA := torch>=2.4,<3
FASHION_MNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: demo test lint setup system-deps clean

demo: $(STAMP) system-deps
	$(BIN)/testbed demo $(DEMO_ARGS)

test: $(STAMP) system-deps lint
	$(BIN)/pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check --quiet .
	$(BIN)/lint-imports --no-cache >/dev/null || $(BIN)/lint-imports --no-cache

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed (set PYTHON=...)")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { \
	  echo "python3 -m venv failed: on Debian, apt-get install python3-venv"; exit 1; }
	@echo "setting up $(VENV) (once; again only when pyproject.toml changes)"
	@$(BIN)/python -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then \
	  $(BIN)/python -m pip install -q '$(TORCH_CUDA)'; \
	else \
	  $(BIN)/python -c 'import torch' 2>/dev/null || $(BIN)/python -m pip install -q '$(TORCH_CPU)'; \
	fi
	@$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

# Debian's Fashion-MNIST; without it (and without root) the demo falls back to scikit-learn's digits.
system-deps:
	@if [ ! -e $(FASHION_MNIST) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian package dataset-fashion-mnist"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null \
	      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null; } \
	      || echo "could not install dataset-fashion-mnist: the demo uses scikit-learn's digits instead"; \
	  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then \
	    sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null \
	      || echo "could not install dataset-fashion-mnist: the demo uses scikit-learn's digits instead"; \
	  else \
	    echo "note: dataset-fashion-mnist is not installed (needs root: apt-get install dataset-fashion-mnist);" \
	         "the demo uses scikit-learn's digits instead"; \
	  fi; \
	fi

clean:
	rm -rf runs .pytest_cache .ruff_cache .hypothesis
