# mptrain — `make help` lists the targets. `make train` and `make test` install first when needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The pinned torch pair (a CUDA build; runs on CPU too). Change both together.
TORCH  := torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install shell train test test-slow test-all lint clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP) ## create .venv with the pinned torch and mptrain (editable) plus dev tools

shell: $(STAMP) ## a shell with .venv active, so that mptrain, mptrain-eval, ... are on PATH (exit leaves it)
	@echo "(.venv active: mptrain, mptrain-eval, mptrain-sample, mptrain-export ...; exit to leave)"
	@VIRTUAL_ENV="$(CURDIR)/$(VENV)" PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $${SHELL:-/bin/bash} -i

train: $(STAMP) ## run the default training job (small CNN on digits, precision=amp), offline, CPU or GPU
	$(VENV)/bin/mptrain

test: $(STAMP) ## run the test suite (about 6 minutes on 2 idle cores; slow tests excluded; lists the 15 slowest)
	$(PY) -m pytest -m "not slow" --durations=15 $(PYTEST_ARGS)

test-slow: $(STAMP) ## run only the tests marked slow (signals, launchers, wheel install, accuracy parity)
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

test-all: $(STAMP) ## run every test
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP) ## ruff check
	$(VENV)/bin/ruff check mptrain tests scripts

clean: ## remove build artefacts and caches (keeps .venv and outputs/)
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +
