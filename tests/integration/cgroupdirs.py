"""Test cgroups, made and removed by the tests themselves."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def empty_and_remove(path: Path) -> None:
    """Kill what is left in the cgroup `path`, wait for it to empty (5 s at most), remove it."""
    if not path.exists():
        return
    for pid in (path / "cgroup.procs").read_text().split():
        os.kill(int(pid), signal.SIGKILL)
    deadline = time.monotonic() + 5
    while (path / "cgroup.procs").read_text().split() and time.monotonic() < deadline:
        time.sleep(0.05)
    path.rmdir()
