# `make run`: venv, install, embedded servers (unless URLs are set), migrate, seed, report.
# `make test`: venv, install, the whole suite (embedded servers started by the suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-citus test-peewee-lowest lint check bench dev-down clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev,embedded,migrate]'
	touch $@

run: $(STAMP)
	@set -e; \
	if [ -z "$${TENANTDB_DATABASE_URL:-$$DATABASE_URL}" ] || [ -z "$${TENANTDB_REDIS_URL:-$$REDIS_URL}" ]; then \
		eval "$$($(BIN)/tenantdb dev up)"; \
	fi; \
	$(BIN)/tenantdb migrate; \
	$(BIN)/tenantdb seed seeds; \
	$(BIN)/tenantdb report

test: $(STAMP)
	$(BIN)/python -m pytest

# The Citus run: a coordinator and two workers on loopback (TENANTDB_PG_BIN, or a PostgreSQL
# with Citus on PATH or in /usr/lib/postgresql/15/bin); skipped with the reason without one.
test-citus: $(STAMP)
	$(BIN)/python -m pytest --citus

# tenantdb reads Peewee's private query attributes (tenantdb/peewee_internals.py): `test` runs
# on the newest Peewee pyproject.toml allows, this on the lowest, in a venv of its own.
PEEWEE_LOWEST := 4.5.0
LOWEST := .venv-peewee-lowest
test-peewee-lowest: pyproject.toml
	$(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/python -m pip install --quiet -e '.[dev,embedded,migrate]' 'peewee==$(PEEWEE_LOWEST)'
	$(LOWEST)/bin/python -m pytest -q tests/test_peewee_internals.py tests/test_tenancy.py \
		tests/test_isolation.py tests/test_hot_paths.py tests/test_scope.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy --strict tenantdb

check: lint test

# Stops at the first script that fails, and fails itself (set -e holds inside the loop).
bench: $(STAMP)
	@set -e; for script in bench/[!_]*.py; do echo "== $$script"; $(BIN)/python $$script; done

dev-down: $(STAMP)
	$(BIN)/tenantdb dev down

clean:
	-$(BIN)/tenantdb dev down
	rm -rf $(VENV) $(LOWEST) .tenantdb *.egg-info .mypy_cache .ruff_cache .pytest_cache
