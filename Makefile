# xatm: two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: all venv test lint typecheck pytest chaos demo bench servers-up servers-down clean

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

LINTED := $(wildcard xatm cli tests benchmarks)

lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check xatm cli

typecheck: $(STAMP)
	$(VENV)/bin/mypy --strict xatm cli

pytest: $(STAMP)
	$(VENV)/bin/pytest -ra -q $(PYTEST_ARGS)

test: lint typecheck pytest

chaos: $(STAMP)
	$(VENV)/bin/pytest -ra -q -m chaos $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m cli.demo

bench: $(BENCH_STAMP)
	$(PY) -m benchmarks.run $(BENCH_ARGS)

servers-up: $(STAMP)
	$(PY) -m xatm.testing.servers up --dir .xatm-dev

servers-down: $(STAMP)
	$(PY) -m xatm.testing.servers down --dir .xatm-dev

clean: servers-down
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info
