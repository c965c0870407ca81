# hotrestart: containerd runtime shim with CRIU hot restart.
# `make demo` sets a node up and runs a pod through the shim; `make test` runs every tier.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TESTBED_STAMP := /opt/hotrestart-testbed/.installed

.PHONY: setup testbed venv bytecode demo test test-unit test-integration test-e2e test-vm test-vm-smoke vm-image lint typecheck bench proto clean dist installer

setup: testbed venv

testbed:
	bash hack/install-testbed.sh

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# An editable install leaves no bytecode (pip compiles a normal install), and with
# PYTHONDONTWRITEBYTECODE set none is ever written: every `start` verb would compile its
# modules again. Compile the sources as a node install would have them.
bytecode: venv
	$(PY) -m compileall -q shim

venv: $(VENV)/.installed

demo: setup bytecode
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

# The test bed's node VM: Debian 12, systemd as init, cgroup v2 only (hack/vm/build-image.sh).
vm-image:
	bash hack/vm/build-image.sh

# The integration and end-to-end tiers on that node, under containerd's systemd cgroup driver
# (the kubeadm default) and then the cgroupfs one. Under emulation (no usable KVM) this takes
# hours; `test-vm-smoke` is the smoke subset (README, *Node support*). A run cut off part-way
# goes on where it stopped when run again on the same code (what passed is kept in VM_OUT);
# `rm -rf $(VM_OUT)` starts over. VM_SHARD=K/N runs the K-th of N parts of each driver's tests,
# for a machine held for less than the whole (README, *Node support*).
VM_OUT ?= _out/test-vm
VM_SHARD ?=
VM_PART = $(if $(VM_SHARD),-part$(subst /,of,$(VM_SHARD)) --shard $(VM_SHARD))
test-vm: setup bytecode installer
	$(PY) hack/vm.py test --driver systemd --full --timeout 21600 --resume --out $(VM_OUT)/systemd$(VM_PART)
	$(PY) hack/vm.py test --driver cgroupfs --full --timeout 21600 --resume --out $(VM_OUT)/cgroupfs$(VM_PART)

test-vm-smoke: setup bytecode installer
	$(VM_SMOKE)

# cgroup v2 with both drivers, then systemd's hybrid v1 layout with the systemd driver. Each
# runs even when one before it failed; the status says whether any did.
VM_SMOKE = rc=0; for node in "--driver systemd" "--driver cgroupfs" "--cgroup v1 --driver systemd"; do \
	$(PY) hack/vm.py test $$node || rc=1; done; exit $$rc

# The whole suite, as CI runs it: the host's tiers, then the smoke subset in the node VM.
test: setup bytecode lint typecheck installer
	$(PY) -m pytest -q -p no:cacheprovider tests
	$(VM_SMOKE)

# The node bundle: dist/hotrestart-<version>-linux-amd64.tar.gz, a relocatable tree with its own
# Python, CRIU and C library (hack/build-bundle.py says what it holds).
dist: setup
	$(PY) hack/build-bundle.py

# The installer image: dist/hotrestart-installer-<version>.oci.tar, the bundle at /hotrestart, for
# the DaemonSet in runtime-class/ (load it with `ctr -n k8s.io images import`).
installer: dist
	$(PY) hack/build-installer-image.py

bench: setup bytecode
	$(PY) hack/bench.py

proto: venv
	PYTHON=$(PY) bash hack/gen-proto.sh

clean:
	rm -rf $(VENV) build dist *.egg-info hack/cri/gen
