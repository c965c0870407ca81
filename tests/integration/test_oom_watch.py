"""OOM kills seen on a real memory cgroup (v1 on a hybrid node, v2 on a unified one),
including the race systemd's driver sets up: the scope is removed before the shim looks."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hotrestart.runtime import cgroups
from hotrestart.runtime.oom import OOMWatcher, memory_cgroup_dir
from integration.cgroupdirs import empty_and_remove

V2 = cgroups.unified_host()
V1_MEMORY = Path(cgroups.ROOT) / "memory"

# Touches every page, so the kill comes from the cgroup's limit and not at exit.
HOG = "b = bytearray(b'\\x01') * (512 << 20)"


def _require() -> None:
    if os.geteuid() != 0 or not (V2 or V1_MEMORY.is_dir()):
        if os.environ.get("CI"):
            pytest.fail("needs root and a memory cgroup")
        pytest.skip("needs root and a memory cgroup")


@pytest.fixture
def container_cgroup() -> Iterator[Path]:
    """A container's memory cgroup limited to 64 MiB, inside a pod's (as the kubelet lays
    them out: the v2 fallback reads the pod's counter)."""
    _require()
    pod = (Path(cgroups.ROOT) if V2 else V1_MEMORY) / f"hotrestart-test-pod{secrets.token_hex(4)}"
    pod.mkdir()
    ctr = pod / "ctr"
    try:
        if V2:
            (pod / "cgroup.subtree_control").write_text("+memory")
        ctr.mkdir()
        if V2:
            (ctr / "memory.max").write_text(str(64 << 20))
            (ctr / "memory.swap.max").write_text("0")
        else:
            (ctr / "memory.limit_in_bytes").write_text(str(64 << 20))
            (ctr / "memory.swappiness").write_text("0")
        yield ctr
    finally:
        empty_and_remove(ctr)
        empty_and_remove(pod)


def _hog_in(cgroup: Path) -> subprocess.Popen[bytes]:
    # Moves itself in before it allocates, so the kill is the cgroup's.
    script = f"import os; open({str(cgroup / 'cgroup.procs')!r}, 'w').write(str(os.getpid())); {HOG}"
    return subprocess.Popen([sys.executable, "-c", script])


def _remove_blocking(cgroup: Path) -> None:
    """Remove the cgroup as systemd removes an emptied scope, blocking the loop until the
    kernel has signalled the removal (from a work queue) so one wake-up sees all of it."""
    cgroup.rmdir()
    time.sleep(0.3)


async def _settle() -> None:
    """Let the loop run the watcher's reader for what the kernel has signalled by now."""
    for _ in range(10):
        await asyncio.sleep(0.05)


async def test_a_kill_is_reported_once_while_the_cgroup_lives(container_cgroup: Path) -> None:
    kills: list[int] = []
    watcher = OOMWatcher(str(container_cgroup), lambda: kills.append(1))
    watcher.start()
    try:
        hog = _hog_in(container_cgroup)
        await asyncio.to_thread(hog.wait)  # the loop runs the watcher meanwhile
        assert hog.returncode == -signal.SIGKILL
        await _settle()
        await watcher.at_exit(killed=True)  # the exit's own look
        assert len(kills) == 1
        # The removal (runc delete, or systemd emptying a scope) is not a second kill.
        _remove_blocking(container_cgroup)
        await _settle()
        watcher.poll()
        assert len(kills) == 1
    finally:
        watcher.stop()


async def test_a_kill_is_reported_when_the_cgroup_went_before_the_shim_looked(container_cgroup: Path) -> None:
    """Under the systemd driver, systemd removes the emptied scope: on a slow node all of the
    kill, the exit and the removal can come before the shim's loop runs once."""
    kills: list[int] = []
    watcher = OOMWatcher(str(container_cgroup), lambda: kills.append(1))
    watcher.start()
    try:
        hog = _hog_in(container_cgroup)
        hog.wait()  # blocks the loop: the watcher sees nothing meanwhile
        assert hog.returncode == -signal.SIGKILL
        _remove_blocking(container_cgroup)
        await _settle()
        await watcher.at_exit(killed=True)
        assert len(kills) == 1
    finally:
        watcher.stop()


async def test_a_kill_is_reported_when_the_exit_looks_before_the_removal_signalled(container_cgroup: Path) -> None:
    """The cgroup is gone but the kernel has not signalled its removal yet (it does so from a
    work queue): the one signal read is the OOM's, and the exit waits to tell."""
    kills: list[int] = []
    watcher = OOMWatcher(str(container_cgroup), lambda: kills.append(1))
    watcher.start()
    try:
        hog = _hog_in(container_cgroup)
        hog.wait()
        assert hog.returncode == -signal.SIGKILL
        container_cgroup.rmdir()
        await watcher.at_exit(killed=True)  # at once, before the loop ran the reader
        assert len(kills) == 1
        await _settle()
        watcher.poll()
        assert len(kills) == 1
    finally:
        watcher.stop()


async def test_a_cgroup_removed_without_a_kill_reports_nothing(container_cgroup: Path) -> None:
    kills: list[int] = []
    watcher = OOMWatcher(str(container_cgroup), lambda: kills.append(1))
    watcher.start()
    try:
        quiet = subprocess.Popen(["sleep", "60"])
        (container_cgroup / "cgroup.procs").write_text(str(quiet.pid))
        quiet.kill()
        quiet.wait()
        _remove_blocking(container_cgroup)
        await _settle()
        await watcher.at_exit(killed=True)  # died by SIGKILL, but not the OOM killer's
        assert kills == []
    finally:
        watcher.stop()


def test_the_memory_cgroup_of_a_process_is_found(container_cgroup: Path) -> None:
    proc = subprocess.Popen(["sleep", "60"])
    try:
        (container_cgroup / "cgroup.procs").write_text(str(proc.pid))
        assert memory_cgroup_dir(proc.pid) == str(container_cgroup)
    finally:
        proc.kill()
        proc.wait()
