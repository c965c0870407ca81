"""OOM notifications for a container's memory cgroup (cgroup v1 eventfd, v2 memory.events)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import sys
import time
from collections.abc import Callable

from hotrestart.runtime import cgroups

log = logging.getLogger(__name__)

# How long an init's exit may wait, on v1, to tell the removal's signal from an OOM's.
REMOVAL_WAIT = 0.25


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
    also read just before an exit is reported. The notification (the v1 eventfd; on v2 an
    inotify watch, since the kernel marks memory.events modified when a counter moves) makes
    the event arrive while the container runs: a kill of one of its processes is reported
    then, as containerd's runc shim does, and under the systemd driver the cgroup may be gone
    by the time the init's exit is handled (systemd removes an emptied scope).

    When that removal still wins (the kill, the exit and systemd's cleanup all came before
    this process could look), the pod's cgroup answers: v2 counters are hierarchical, so the
    kills the pod's counter gained since this container started, less those this shim has
    already put down to the pod's containers (a pod's containers share one shim under the
    CRI), were this container's if its init died by SIGKILL (`at_exit(killed=True)`). A
    sibling's kill that its own watcher has not read yet, in that same moment, would be
    counted here; containerd's runc shim has no better source.

    v1 counters are not hierarchical, but the eventfd counts: the kernel signals it once
    per OOM (before the kill; also for an OOM of a cgroup above) and once more when the
    cgroup is removed, from a work queue a few milliseconds after the rmdir. Signals read
    while the cgroup still existed were OOMs; of those read once it is gone, one is the
    removal's when it has come. At the exit of an init killed by SIGKILL (`at_exit`), the
    notifications no counted kill explains are reported as kills; when which of the
    signals read is the removal's cannot be told yet, the exit waits up to `REMOVAL_WAIT`
    for one more. An OOM notification without a kill (oom_kill_disable, an OOM above
    resolved elsewhere) followed by a SIGKILL of the init counts as a kill, as containerd's
    runc shim counts every notification.
    """

    def __init__(self, cgroup_dir: str, on_oom: Callable[[], None]) -> None:
        self._dir = cgroup_dir
        self._pod = os.path.dirname(cgroup_dir)
        self._on_oom = on_oom
        self._efd = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._kills = 0
        self._v1 = os.path.exists(os.path.join(cgroup_dir, "memory.oom_control"))
        # v1, all since the start: kills counted, signals read while the cgroup existed
        # (OOMs), and signals read once it was gone (the removal's among them, once it came).
        self._counted = 0
        self._signalled = 0
        self._after = 0
        # v2: the pod's counter and the kills put down to its containers, when this started.
        self._pod_base: tuple[int, int] | None = None

    def start(self) -> None:
        self._kills = self._read_kills() or 0
        if not self._v1:
            # The fallback needs a pod's cgroup above (kubelet's `...-pod<uid>.slice` or
            # `pod<uid>`): a container outside a pod shares its parent with anything at all.
            pod = _kills_in(os.path.join(self._pod, "memory.events"))
            if pod is not None and "pod" in os.path.basename(self._pod):
                self._pod_base = (pod, _PUT_DOWN.get(self._pod, 0))
            self._efd = _watch_modified(os.path.join(self._dir, "memory.events"))
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._efd, self.poll)
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

    def poll(self, *, killed: bool = False) -> None:
        """Report kills that happened since the last look; `killed`: the init has just died
        by SIGKILL (its cgroup may be gone already)."""
        kills = self._read_kills()  # before the eventfd: a notification comes before its kill
        signals = self._drain()
        there = os.path.isdir(self._dir)  # after the drain: the removal signals only once it is gone
        if self._v1:
            if there:
                self._signalled += signals
            else:
                self._after += signals
        if kills is not None and kills > self._kills:
            self._report(kills - self._kills)
            self._counted += kills - self._kills
            self._kills = kills
        if there or self._v1 or not killed:
            return
        # v2, gone: only the exit's own look may use the pod's counter (the inotify wake-up
        # that finds the cgroup gone must leave it for that look), and only once.
        unexplained = self._unexplained_pod_kills()
        self._pod_base = None
        if unexplained > 0:
            self._report(unexplained)  # every process of the container may have gone

    async def at_exit(self, *, killed: bool) -> None:
        """The look at the init's exit, before it is reported; `killed`: it died by SIGKILL."""
        self.poll(killed=killed)
        if not self._v1 or not killed or self._efd < 0 or os.path.isdir(self._dir):
            return
        # v1, the cgroup gone. Were every signal read since an OOM's, would any be unexplained?
        if self._after and self._signalled + self._after - self._counted > 0:
            more = await self._next_signals(REMOVAL_WAIT)
            if more:  # the removal's came only now: those before were all OOMs
                self._after += more - 1
            else:
                self._after -= 1  # one of them was the removal's
        unexplained = self._signalled + self._after - self._counted
        self.stop()  # nothing more to learn
        if unexplained > 0:
            self._counted += unexplained
            self._report(unexplained)

    async def _next_signals(self, timeout: float) -> int:
        """Wait up to `timeout` for the eventfd to be signalled again; how many times it was."""
        deadline = time.monotonic() + timeout
        while True:
            n = self._drain()
            if n or time.monotonic() >= deadline:
                return n
            await asyncio.sleep(0.01)

    def _drain(self) -> int:
        """Consume the notification; on v1 the number of eventfd signals it held."""
        if self._efd < 0:
            return 0
        try:
            data = os.read(self._efd, 4096)
        except OSError:  # nothing pending
            return 0
        return int.from_bytes(data[:8], sys.byteorder) if self._v1 and len(data) >= 8 else 0

    def _unexplained_pod_kills(self) -> int:
        if self._pod_base is None:
            return 0
        now = _kills_in(os.path.join(self._pod, "memory.events"))
        pod, put_down = self._pod_base
        return 0 if now is None else (now - pod) - (_PUT_DOWN.get(self._pod, 0) - put_down)

    def _report(self, kills: int) -> None:
        _PUT_DOWN[self._pod] = _PUT_DOWN.get(self._pod, 0) + kills
        self._on_oom()

    def _read_kills(self) -> int | None:
        return _kills_in(os.path.join(self._dir, "memory.oom_control" if self._v1 else "memory.events"))

    def stop(self) -> None:
        if self._efd >= 0:
            if self._loop is not None:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(self._efd)
            with contextlib.suppress(OSError):
                os.close(self._efd)
            self._efd = -1


# Per pod cgroup: the kills this process has reported for the containers in it.
_PUT_DOWN: dict[str, int] = {}


def _kills_in(path: str) -> int | None:
    """The oom_kill counter of a memory.oom_control or memory.events file; None when it
    cannot be read (the cgroup is gone)."""
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
    except (OSError, ValueError):
        return None
    return 0


_IN_MODIFY = 0x2


def _watch_modified(path: str) -> int:
    """An inotify descriptor (non-blocking) that turns readable when `path` is modified."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = int(libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"inotify_init1: {os.strerror(err)}")
    if libc.inotify_add_watch(fd, os.fsencode(path), _IN_MODIFY) < 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise OSError(err, f"inotify_add_watch {path}: {os.strerror(err)}")
    return fd
