# lloom — every target installs what it needs itself.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NODE_STAMP := node_modules/.installed
INTEROP_STAMP := tests/interop/js/node_modules/.installed
PYTEST_ARGS ?=

.PHONY: help install test lint typecheck unit bench lock clean sysdeps npm contract

help:
	@echo "make test   - install everything needed, then ruff, mypy --strict and the whole test suite"
	@echo "make bench  - run the benchmarks and write docs/benchmarks.md"
	@echo "make install- create .venv and install pinned dependencies"

# System packages: fastecdsa (a py-libp2p dependency) compiles against GMP.
sysdeps:
	@if ! dpkg -s libgmp-dev >/dev/null 2>&1; then \
	  echo "installing libgmp-dev (apt)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq libgmp-dev; \
	fi

$(STAMP): pyproject.toml requirements.lock | sysdeps
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	$(PY) -m pip check
	@touch $@

install: $(STAMP)

$(INTEROP_STAMP): tests/interop/js/package.json tests/interop/js/package-lock.json
	cd tests/interop/js && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

# anvil (a local chain) and solcjs, into the repository's own node_modules.
$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	@touch $@

npm: $(INTEROP_STAMP) $(NODE_STAMP)

# Rebuild contracts/out/Accounting.json (checked in; a test fails when it is stale).
contract: $(NODE_STAMP)
	node scripts/compile_contract.mjs

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

test: $(STAMP) npm lint typecheck
	$(PY) -m pytest $(PYTEST_ARGS)

unit: $(STAMP)
	$(PY) -m pytest -m "not e2e and not interop" $(PYTEST_ARGS)

# LiteLLM's proxy, the peer the request-path benchmark compares against; its own venv
# (it pins packages that clash with ours). Version as measured in the field notes.
LITELLM_VENV := bench/.litellm-venv
LITELLM_STAMP := $(LITELLM_VENV)/.installed
$(LITELLM_STAMP):
	$(PYTHON) -m venv $(LITELLM_VENV)
	$(LITELLM_VENV)/bin/pip install -q --disable-pip-version-check 'litellm[proxy]==1.108.7'
	@touch $@

bench: $(STAMP) $(LITELLM_STAMP)
	$(PY) -m bench

lock: $(STAMP)
	(echo "# Exact versions of every Python package, tested together (pip check clean)."; \
	 echo "# Regenerate: make lock"; $(PY) -m pip freeze --exclude-editable | grep -v -i '^lloom') > requirements.lock

clean:
	rm -rf $(VENV) node_modules tests/interop/js/node_modules .mypy_cache .ruff_cache .pytest_cache
