"""OOM notifications for a container's memory cgroup (cgroup v1 eventfd, v2 memory.events)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable

log = logging.getLogger(__name__)


def memory_cgroup_dir(pid: int) -> str | None:
    """The memory cgroup directory of `pid` on this host, v1 or v2."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    unified = None
    for line in lines:
        _hid, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return os.path.join("/sys/fs/cgroup/memory", path.lstrip("/"))
        if controllers == "":
            unified = os.path.join("/sys/fs/cgroup", path.lstrip("/"))
    if unified and os.path.exists(os.path.join(unified, "memory.events")):
        return unified
    return None


class OOMWatcher:
    """Calls `on_oom` once per OOM kill in the cgroup (v1 only; v2 is polled on exit)."""

    def __init__(self, cgroup_dir: str, on_oom: Callable[[], None]) -> None:
        self._dir = cgroup_dir
        self._on_oom = on_oom
        self._efd = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._v2_kills = 0

    def start(self) -> None:
        control = os.path.join(self._dir, "memory.oom_control")
        if os.path.exists(control):
            efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            cfd = os.open(control, os.O_RDONLY | os.O_CLOEXEC)
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
        else:
            self._v2_kills = self._read_v2()

    def poll(self) -> None:
        """Deliver any pending notification now (also called just before an exit is reported)."""
        if self._efd >= 0:
            try:
                os.eventfd_read(self._efd)
            except (BlockingIOError, OSError):
                return
            # The eventfd also fires when the cgroup is removed; only report a real kill.
            if self._v1_under_oom_or_killed():
                self._on_oom()
        else:
            kills = self._read_v2()
            if kills > self._v2_kills:
                self._v2_kills = kills
                self._on_oom()

    def _v1_under_oom_or_killed(self) -> bool:
        try:
            with open(os.path.join(self._dir, "memory.oom_control")) as f:
                fields = dict(line.split() for line in f if line.strip())
        except OSError:
            return False
        kills = int(fields.get("oom_kill", "0"))
        if kills > self._v2_kills or fields.get("under_oom") == "1":
            self._v2_kills = kills
            return True
        return False

    def _read_v2(self) -> int:
        try:
            with open(os.path.join(self._dir, "memory.events")) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except OSError:
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
