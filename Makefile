# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv when it is missing and install into it once: a stamp per install
# flavour, remade only when pyproject.toml or the CPU constraints change.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
CONSTRAINTS := constraints-cpu.txt
DEMO_ARGS ?=

.PHONY: demo test lint typecheck clean-venv

demo: $(VENV)/.installed-base
	$(BIN)/mpo demo $(DEMO_ARGS)

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check mpo tasks flows tests benchmarks

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip>=24"

$(VENV)/.installed-base: pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(PIP) install --quiet -c $(CONSTRAINTS) -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(PIP) install --quiet -c $(CONSTRAINTS) -e '.[dev]'
	touch $@ $(VENV)/.installed-base

clean-venv:
	rm -rf $(VENV)
