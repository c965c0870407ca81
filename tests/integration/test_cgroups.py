"""The freeze handed to CRIU: never with a process caught inside vfork() (a real freezer: the
v1 freezer controller, or a v2 cgroup's cgroup.freeze on a node with the unified hierarchy)."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hotrestart.runtime import cgroups
from integration.cgroupdirs import empty_and_remove

FREEZER = Path("/sys/fs/cgroup/freezer")

# A parent blocked in vfork(): the child never execs (it waits in pause()).
VFORK_PARENT = """
import ctypes, os, time
time.sleep(0.3)  # moved into the test cgroup meanwhile, so the child is born there
libc = ctypes.CDLL(None)
if libc.vfork() == 0:
    libc.pause()
"""


V2 = cgroups.unified_host()


@pytest.fixture
def freezer() -> Iterator[Path]:
    if os.geteuid() != 0 or not (V2 or FREEZER.is_dir()):
        if os.environ.get("CI"):
            pytest.fail("needs root and a cgroup freezer")
        pytest.skip("needs root and a cgroup freezer")
    path = (Path(cgroups.ROOT) if V2 else FREEZER) / f"hotrestart-test-{secrets.token_hex(4)}"
    path.mkdir()
    try:
        yield path
    finally:
        if V2:
            (path / "cgroup.freeze").write_text("0")
        else:
            (path / "freezer.state").write_text("THAWED")
        empty_and_remove(path)


def _state(path: Path) -> str:
    if V2:
        return "FROZEN" if "frozen 1" in (path / "cgroup.events").read_text() else "THAWED"
    return (path / "freezer.state").read_text().strip()


def test_an_ordinary_tree_is_frozen(freezer: Path) -> None:
    proc = subprocess.Popen(["sleep", "60"])
    (freezer / "cgroup.procs").write_text(str(proc.pid))
    assert cgroups.freeze_quiescent(proc.pid)
    assert _state(freezer) == "FROZEN"
    cgroups.thaw(proc.pid)
    assert _state(freezer) == "THAWED"
    proc.kill()
    proc.wait()


def test_a_process_inside_vfork_is_never_handed_over_frozen(freezer: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", VFORK_PARENT])
    (freezer / "cgroup.procs").write_text(str(proc.pid))
    deadline = time.monotonic() + 10
    while len((freezer / "cgroup.procs").read_text().split()) < 2:
        assert time.monotonic() < deadline, "the vfork child never appeared"
        time.sleep(0.05)
    assert not cgroups.freeze_quiescent(proc.pid, attempts=3, delay=0.01)
    assert _state(freezer) == "THAWED", "a freeze CRIU could not seize is not left behind"
    proc.kill()
    proc.wait()


def test_procs_lists_the_container(freezer: Path) -> None:
    procs = [subprocess.Popen(["sleep", "60"]) for _ in range(2)]
    for p in procs:
        (freezer / "cgroup.procs").write_text(str(p.pid))
    assert sorted(cgroups.procs(procs[0].pid)) == sorted(p.pid for p in procs)
    for p in procs:
        p.kill()
        p.wait()


def test_a_freeze_is_undone_after_its_process_is_gone(freezer: Path) -> None:
    """A process that dies frozen (an OOM kill during a dump) leaves its cgroup frozen on v2,
    and runc would call the container paused forever: the thaw goes by the cgroup found
    before the freeze, not by the pid."""
    proc = subprocess.Popen(["sleep", "60"])
    (freezer / "cgroup.procs").write_text(str(proc.pid))
    where = cgroups.freezer_of(proc.pid)
    assert where is not None and Path(where[1]) == freezer
    assert cgroups.freeze_quiescent(proc.pid)
    gone = 1 << 22  # above pid_max's default: no such process
    cgroups.thaw(gone)
    assert _state(freezer) == "FROZEN", "nothing to find by a pid that is gone"
    cgroups.thaw(gone, where)
    assert _state(freezer) == "THAWED"
    proc.kill()
    proc.wait()
