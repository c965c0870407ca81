# hotrestart: containerd runtime shim with CRIU hot restart.
# `make demo` sets a node up and runs a pod through the shim; `make test` runs every tier.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TESTBED_STAMP := /opt/hotrestart-testbed/.installed

.PHONY: setup testbed venv demo test test-unit test-integration test-e2e lint typecheck bench proto clean

setup: testbed venv

testbed:
	bash hack/install-testbed.sh

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

demo: setup
	$(PY) hack/demo.py

lint: venv
	$(VENV)/bin/ruff check shim tests hack
	$(VENV)/bin/ruff format --check shim tests hack

typecheck: venv
	$(VENV)/bin/mypy

test-unit: venv
	$(PY) -m pytest -q tests/unit

test-integration: setup
	$(PY) -m pytest -q tests/integration

test-e2e: setup
	$(PY) -m pytest -q tests/e2e

# The whole suite, as CI runs it.
test: setup lint typecheck
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: setup
	$(PY) hack/bench.py

proto: venv
	PYTHON=$(PY) bash hack/gen-proto.sh

clean:
	rm -rf $(VENV) build *.egg-info tests/e2e/cri/gen
