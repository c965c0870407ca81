"""Fixtures of the end-to-end tests: a private containerd and a CRI client.

The test bed (containerd 2.x/1.7, runc 1.3, CRIU 4, CNI plugins, busybox) is
installed by ``sudo bash hack/install-testbed.sh``.  Without it, or without
root, the e2e tests are skipped -- unless the environment variable CI is set,
in which case they fail: CI must never silently skip them.

Environment:
  HOTRESTART_TESTBED          test bed prefix (default /opt/hotrestart-testbed)
  HOTRESTART_E2E_CONTAINERD   "2" (default) or "1.7": containerd of the session
  HOTRESTART_E2E_LOG_LEVEL    containerd log level (default "info")
  HOTRESTART_E2E_SHIM_DIR     where containerd finds the shim (default: this venv's bin)
  HOTRESTART_E2E_CGROUP_DRIVER  containerd's cgroup driver: "cgroupfs" (default) or "systemd"
  HOTRESTART_E2E_MEMHOG       a static build of hack/memhog.c (default: built with gcc)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import objstore

# The test bed lives in hack/ (shared with hack/bench.py and demo.py); pyproject's pytest
# settings put hack/ on sys.path.
from testbed import (
    BIN_DIR,
    CONTAINERD_17_BIN_DIR,
    TESTBED,
    ContainerdInstance,
)
from testbed.ci import in_ci
from testbed.pods import make_pod_config

E2E_DIR = Path(__file__).resolve().parent
MEMHOG_SOURCE = E2E_DIR.parents[1] / "hack" / "memhog.c"

SHIM_NAME = "containerd-shim-hotrestart-v2"


def testbed_problems() -> list[str]:
    problems = []
    if os.geteuid() != 0:
        problems.append("the e2e tests need root")
    if not (TESTBED / ".stamp").is_file() or not (BIN_DIR / "containerd").exists():
        problems.append(f"no test bed in {TESTBED} (run `sudo bash hack/install-testbed.sh`)")
    for mod in ("grpc", "grpc_tools"):
        try:
            __import__(mod)
        except ImportError:
            problems.append(f"python module {mod} is missing (pip install grpcio grpcio-tools)")
    return problems


def shim_bin_dir() -> Path:
    """Directory holding containerd-shim-hotrestart-v2: HOTRESTART_E2E_SHIM_DIR (a node
    bundle's bin/, say), this venv's bin, or PATH."""
    if os.environ.get("HOTRESTART_E2E_SHIM_DIR"):
        return Path(os.environ["HOTRESTART_E2E_SHIM_DIR"])
    venv_bin = Path(sys.executable).parent
    if (venv_bin / SHIM_NAME).exists():
        return venv_bin
    found = shutil.which(SHIM_NAME)
    return Path(found).parent if found else venv_bin


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if E2E_DIR in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def testbed() -> Path:
    """The test bed prefix; skips (fails under CI) when it cannot be used."""
    problems = testbed_problems()
    if problems:
        msg = "; ".join(problems)
        if in_ci():
            pytest.fail(f"e2e test bed unusable under CI: {msg}", pytrace=False)
        pytest.skip(msg)
    return TESTBED


@pytest.fixture(scope="session")
def containerd_factory(
    testbed: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., ContainerdInstance]]:
    """make(version="2"|"1.7", start=True, **ContainerdInstance kwargs).

    Instances are stopped (and checked for leftovers) at the end of the
    session at the latest; tests may stop them earlier themselves.
    """
    ContainerdInstance.reap_stale()
    logs = tmp_path_factory.mktemp("containerd-logs")
    made: list[ContainerdInstance] = []

    def make(version: str = "2", start: bool = True, **kwargs: Any) -> ContainerdInstance:
        kwargs.setdefault("binaries_dir", CONTAINERD_17_BIN_DIR if version == "1.7" else BIN_DIR)
        kwargs.setdefault("shim_bin_dir", shim_bin_dir())
        kwargs.setdefault("log_dir", logs)
        kwargs.setdefault("log_level", os.environ.get("HOTRESTART_E2E_LOG_LEVEL", "info"))
        inst = ContainerdInstance(**kwargs)
        made.append(inst)
        if start:
            try:
                inst.start()
            except BaseException:
                inst.stop()
                raise
        return inst

    yield make
    leaks = []
    for inst in made:
        for problem in inst.stop():
            if problem.startswith("CRI teardown"):
                warnings.warn(f"{inst}: {problem}", stacklevel=1)
            else:
                leaks.append(f"{inst}: {problem}")
    assert not leaks, "test bed cleanup failed:\n" + "\n".join(leaks)


@pytest.fixture(scope="session")
def containerd(containerd_factory: Callable[..., ContainerdInstance]) -> ContainerdInstance:
    """The session's containerd (2.x unless HOTRESTART_E2E_CONTAINERD=1.7)."""
    return containerd_factory(os.environ.get("HOTRESTART_E2E_CONTAINERD", "2"))


@pytest.fixture
def cri(containerd: ContainerdInstance) -> Iterator[Any]:
    """A CRIClient on the session containerd.

    Pods this client ran and that the test left behind are stopped and
    removed afterwards, so tests do not leak into each other.
    """
    client = containerd.cri()
    try:
        yield client
    finally:
        for pod_id in list(client._pods):
            for step in (client.stop_pod_sandbox, client.remove_pod_sandbox):
                try:
                    step(pod_id)
                except Exception as e:
                    warnings.warn(f"cleanup of pod {pod_id}: {e}", stacklevel=1)
                    break
        client.close()


@pytest.fixture
def pod_config(
    request: pytest.FixtureRequest, cri: Any, containerd: ContainerdInstance, tmp_path: Path
) -> Callable[..., Any]:
    """pod_config(name=<test name>, **CRIClient.pod_config kwargs) -> PodSandboxConfig."""

    def make(name: str | None = None, **kwargs: Any) -> Any:
        return make_pod_config(cri, containerd, tmp_path / "pods", name or request.node.name, **kwargs)

    return make


@pytest.fixture(scope="module", params=["2", "1.7"], ids=["containerd2", "containerd1.7"])
def inst(request: pytest.FixtureRequest, containerd_factory: Callable[..., ContainerdInstance]) -> ContainerdInstance:
    """One containerd per module and version: the module's tests run on 2.x and on 1.7."""
    return containerd_factory(request.param)


@pytest.fixture
def client(inst: ContainerdInstance) -> Iterator[Any]:
    """A CRIClient on `inst`; whatever the test left running is removed afterwards."""
    c = inst.cri()
    try:
        yield c
    finally:
        c.remove_all(stop_timeout=0)
        c.close()


@pytest.fixture
def empty_store(inst: ContainerdInstance) -> None:
    """The test starts with an empty checkpoint store (checkpoints are per identity, counts are not)."""
    shutil.rmtree(inst.store / "v1", ignore_errors=True)


@pytest.fixture(scope="session")
def memhog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """hack/memhog.c built static: it fills its memory with half-compressible bytes, prints
    a counter and a checksum over all of it, and on SIGUSR1 rewrites MEMHOG_CHURN percent."""
    prebuilt = os.environ.get("HOTRESTART_E2E_MEMHOG")  # built by the host for a node VM
    if prebuilt:
        return Path(prebuilt)
    binary = tmp_path_factory.mktemp("memhog") / "memhog"
    subprocess.run(["gcc", "-static", "-O2", "-pthread", "-o", str(binary), str(MEMHOG_SOURCE)], check=True)
    return binary


@pytest.fixture(scope="session")
def s3_env() -> Iterator[dict[str, str]]:
    """The S3 environment of the test bed's Ceph RADOS Gateway (started on first use)."""
    with objstore.running() as env:
        yield env
