"""Fixtures for unit tests that run real processes under a fake runc, without root.

The test process becomes a child subreaper for the duration of a test, as the shim is one:
the fake runc's container processes outlive the runc call that forked them and must come
back to us to be reaped. Whatever a test leaves running is killed and reaped afterwards.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from fakes import EventRecorder, FakeRunc, children_of

from hotrestart.events import TaskEvents
from hotrestart.reaper import PR_SET_CHILD_SUBREAPER, Reaper, become_subreaper
from hotrestart.runtime.command import CommandRunner
from hotrestart.runtime.runc import Runc


@pytest.fixture
def fake_runc(tmp_path: Path) -> FakeRunc:
    return FakeRunc(tmp_path / "fake-runc", tmp_path / "runc-root")


@pytest.fixture
async def reaper(fake_runc: FakeRunc) -> AsyncIterator[Reaper]:
    before = set(children_of(os.getpid()))
    become_subreaper()
    loop = asyncio.get_running_loop()
    reaper = Reaper()
    reaper.install(loop)
    try:
        yield reaper
    finally:
        fake_runc.kill_all()
        loop.remove_signal_handler(signal.SIGCHLD)
        ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        reaper.reap()
    # Left-overs were killed above; anything else (a runc call, a process the fake does not
    # know of) escaped the shim's clean-up.
    left = set(children_of(os.getpid())) - before
    assert not left, f"processes left running: {sorted(left)}"


@pytest.fixture
def recorder() -> EventRecorder:
    return EventRecorder()


@pytest.fixture
def task_events(recorder: EventRecorder) -> TaskEvents:
    return TaskEvents(recorder)


@pytest.fixture
def runc(fake_runc: FakeRunc, reaper: Reaper, tmp_path: Path) -> Runc:
    return Runc(
        CommandRunner(reaper),
        binary=str(fake_runc.binary),
        root=str(fake_runc.root),
        log_path=str(tmp_path / "runc-log.json"),
    )


@pytest.fixture(autouse=True)
def no_mounts_left(tmp_path: Path) -> Iterator[None]:
    """Work areas are tmpfs mounts when run as root: a test must leave none behind."""
    yield
    with open("/proc/self/mounts") as f:
        left = [line.split()[1] for line in f if line.split()[1].startswith(str(tmp_path))]
    for path in reversed(left):
        subprocess.run(["umount", "-l", path], check=False, capture_output=True)
    assert not left, f"mounts left behind: {left}"
