"""OOM notifications for a container's memory cgroup (cgroup v1 eventfd, v2 memory.events)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable

from hotrestart.runtime import cgroups

log = logging.getLogger(__name__)


def memory_cgroup_dir(pid: int) -> str | None:
    """The memory cgroup directory of `pid` on this host, v1 or v2."""
    memberships = cgroups.of_pid(pid)
    v1 = cgroups.controller_dir(memberships, "memory")
    if v1 is not None:
        return v1
    unified = cgroups.unified_dir(memberships)
    if unified is not None and os.path.exists(os.path.join(unified, "memory.events")):
        return unified
    return None


class OOMWatcher:
    """Calls `on_oom` once per new OOM kill in the cgroup.

    The kill counter (v1 `memory.oom_control` oom_kill, v2 `memory.events` oom_kill) is the
    source of truth: some kernels never signal the v1 eventfd for a kill, so the counter is
    also read just before an exit is reported. The eventfd, where it fires, only makes the
    event arrive earlier.
    """

    def __init__(self, cgroup_dir: str, on_oom: Callable[[], None]) -> None:
        self._dir = cgroup_dir
        self._on_oom = on_oom
        self._efd = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._kills = 0

    @property
    def _v1(self) -> bool:
        return os.path.exists(os.path.join(self._dir, "memory.oom_control"))

    def start(self) -> None:
        self._kills = self._read_kills()
        if not self._v1:
            return
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        cfd = os.open(os.path.join(self._dir, "memory.oom_control"), os.O_RDONLY | os.O_CLOEXEC)
        try:
            with open(os.path.join(self._dir, "cgroup.event_control"), "w") as f:
                f.write(f"{efd} {cfd}")
        except OSError:
            os.close(efd)
            raise
        finally:
            os.close(cfd)
        self._efd = efd
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(efd, self.poll)

    def poll(self) -> None:
        """Report kills that happened since the last look."""
        if self._efd >= 0:
            with contextlib.suppress(OSError):
                os.eventfd_read(self._efd)
        kills = self._read_kills()
        if kills > self._kills:
            self._kills = kills
            self._on_oom()

    def _read_kills(self) -> int:
        name = "memory.oom_control" if self._v1 else "memory.events"
        try:
            with open(os.path.join(self._dir, name)) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def stop(self) -> None:
        if self._efd >= 0:
            if self._loop is not None:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(self._efd)
            with contextlib.suppress(OSError):
                os.close(self._efd)
            self._efd = -1
