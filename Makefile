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

# Debian packages the demo and the tests use: Fashion-MNIST (without it the demo falls back to scikit-learn's
# digits), Prometheus + promtool (metrics and dashboard tests), openssh-server (real sshd in the lab's hosts).
# Installed when we are root (or have passwordless sudo); otherwise the tests that need them are skipped.
SYSTEM_PACKAGES := dataset-fashion-mnist prometheus openssh-server
system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then sudo=""; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo="sudo -n"; \
	  else sudo="none"; fi; \
	  if [ "$$sudo" != none ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian packages:$$missing"; \
	    $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing >/dev/null \
	      || { $$sudo apt-get update -q >/dev/null && $$sudo env DEBIAN_FRONTEND=noninteractive \
	           apt-get install -y -q --no-install-recommends $$missing >/dev/null; } \
	      || echo "could not install$$missing: the tests that need them are skipped"; \
	  else \
	    echo "note: not installed:$$missing (needs root: apt-get install$$missing);" \
	         "the demo uses scikit-learn's digits without Fashion-MNIST, the tests that need the others are skipped"; \
	  fi; \
	fi

clean:
	rm -rf runs .pytest_cache .ruff_cache .hypothesis
