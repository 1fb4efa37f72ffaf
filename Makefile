# xatm: two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: all venv test lint typecheck pytest promtool drivers mysqlclient chaos sim demo bench servers-up \
	servers-down clean

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# -- MySQL driver legs (tests/driver_legs.sh) -------------------------------------------------
# mysql-connector's C extension: 26.x needs OpenSSL 3.2 and falls back to pure Python on
# Debian 12; 9.5.0's extension loads there. It gets a venv of its own.
CEXT_VENV      := .venv-cext
CEXT_STAMP     := $(CEXT_VENV)/.installed
CEXT_CONNECTOR := mysql-connector-python==9.5.0

$(CEXT_STAMP): pyproject.toml
	$(PYTHON) -m venv $(CEXT_VENV)
	$(CEXT_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(CEXT_VENV)/bin/python -m pip install --quiet -e '.[dev]' '$(CEXT_CONNECTOR)'
	$(CEXT_VENV)/bin/python -c 'import mysql.connector as m; assert m.HAVE_CEXT, "the C extension of mysql-connector " + m.__version__ + " does not load"'
	touch $(CEXT_STAMP)

# mysqlclient builds against the MariaDB client library: its headers come from Debian's
# libmariadb-dev (and pkg-config), installed here when missing and we are root (as CI is).
# If it still cannot be built, the reason is kept and the mysqldb leg is reported as not run.
MYSQLCLIENT_STAMP := $(VENV)/.installed-mysqlclient

$(MYSQLCLIENT_STAMP): $(STAMP)
	@rm -f $(VENV)/.mysqlclient-skipped
	@if ! pkg-config --exists libmariadb 2>/dev/null && ! pkg-config --exists mysqlclient 2>/dev/null; then \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	        echo "installing libmariadb-dev and pkg-config (to build mysqlclient)"; \
	        apt-get install -y -qq libmariadb-dev pkg-config >/dev/null 2>&1 \
	        || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libmariadb-dev pkg-config >/dev/null 2>&1; } \
	        || true; \
	    fi; \
	fi
	@if $(PY) -m pip install --quiet 'mysqlclient>=2.1' >$(VENV)/.mysqlclient-build.log 2>&1; then \
	    touch $(MYSQLCLIENT_STAMP); \
	else \
	    echo "mysqlclient could not be built (needs libmariadb-dev, pkg-config and a C compiler; see $(VENV)/.mysqlclient-build.log)" | tee $(VENV)/.mysqlclient-skipped; \
	fi

mysqlclient: $(STAMP)
	@$(MAKE) --no-print-directory $(MYSQLCLIENT_STAMP)

drivers: $(STAMP) $(CEXT_STAMP) mysqlclient
	VENV=$(VENV) CEXT_VENV=$(CEXT_VENV) tests/driver_legs.sh

LINTED := $(wildcard xatm tests benchmarks examples)

lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check xatm

typecheck: $(STAMP)
	$(VENV)/bin/mypy --strict xatm

# promtool (Debian's prometheus package) checks the alert rules in the suite; installed here
# when missing and we are root (as CI is); without it that one test is skipped, saying why
promtool:
	@command -v promtool >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	    && { apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 \
	         || { apt-get update -qq >/dev/null 2>&1 \
	              && apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1; }; } \
	    || echo "promtool could not be installed: the rules check is skipped"; }

# `make test` runs every chaos mode for 15 s (`make chaos`: 30 s each, the tests' default)
SUITE_CHAOS_SECONDS ?= 15

# The suite runs on TEST_JOBS worker processes (pytest-xdist), each test file whole in one
# worker, each worker with private servers of its own; TEST_JOBS=0 runs it in this process
TEST_JOBS ?= 2

pytest: $(STAMP) promtool
	XATM_CHAOS_SECONDS=$${XATM_CHAOS_SECONDS:-$(SUITE_CHAOS_SECONDS)} \
	XATM_OMISSION_SECONDS=$${XATM_OMISSION_SECONDS:-$(SUITE_CHAOS_SECONDS)} \
	    $(VENV)/bin/pytest -ra -q -n $(TEST_JOBS) --dist loadfile $(PYTEST_ARGS)

# the full suite once (default driver), then the driver-sensitive tests per MySQL driver
test: lint typecheck pytest drivers

chaos: $(STAMP)
	$(VENV)/bin/pytest -ra -q -m chaos $(PYTEST_ARGS)

# The deterministic simulator (tests/sim, docs/testing.md): SEEDS seeds on JOBS processes;
# `make sim SEED=n` replays one seed with its trace; `make sim HOURS=h` runs new seeds for h hours
SEEDS ?= 720
JOBS  ?= 2
SIM_ARGS ?=

sim: $(STAMP)
ifdef SEED
	$(PY) -m tests.sim.run --seed $(SEED) $(SIM_ARGS)
else ifdef HOURS
	$(PY) -m tests.sim.run --hours $(HOURS) --jobs $(JOBS) --quiet $(SIM_ARGS)
else
	$(PY) -m tests.sim.run --seeds $(SEEDS) --jobs $(JOBS) --quiet $(SIM_ARGS)
endif

demo: $(STAMP)
	$(PY) -m examples.demo

# The harness runs from .venv-cext (mysql-connector 9.5.0, whose C extension loads on Debian 12)
# so that one run measures the pure-Python modes and the C-extension ones (raw-cext, xatm-cext,
# xatm-fast-cext) side by side; every other mode asks for pure Python (use_pure=true).
CEXT_BENCH_STAMP := $(CEXT_VENV)/.installed-bench

$(CEXT_BENCH_STAMP): $(CEXT_STAMP)
	$(CEXT_VENV)/bin/python -m pip install --quiet -e '.[dev,bench]' '$(CEXT_CONNECTOR)'
	$(CEXT_VENV)/bin/python -c 'import mysql.connector as m; assert m.HAVE_CEXT, "the C extension of mysql-connector " + m.__version__ + " does not load"'
	touch $(CEXT_BENCH_STAMP)

#: every run also keeps its numbers (JSON) and its plot; override to change or drop them
BENCH_ARGS ?= --json benchmarks/results/latest.json --plot benchmarks/results/throughput.png

bench: $(CEXT_BENCH_STAMP)
	$(CEXT_VENV)/bin/python -m benchmarks.run $(BENCH_ARGS)

servers-up: $(STAMP)
	$(PY) -m xatm.testing.servers up --dir .xatm-dev

servers-down: $(STAMP)
	$(PY) -m xatm.testing.servers down --dir .xatm-dev

clean: servers-down
	rm -rf $(VENV) $(CEXT_VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info
