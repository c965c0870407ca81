"""The one owner of waitpid in the shim.

The shim is a child subreaper: container init processes started by `runc create --detach`
and exec processes are re-parented to it. Reaping with waitpid(-1) here and handing each
status to whoever waits for that pid avoids racing asyncio's or subprocess's own watchers,
which the shim therefore never uses.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import logging
import os
import signal
import time

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36
_UNCLAIMED_LIMIT = 4096

# Bound once at import (in the zygote, for forked shims): building a ctypes library handle
# creates classes, which a shim would otherwise do, and pay for, on its own.
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def exit_code(wait_status: int) -> int:
    """Shell-style exit code: the exit status, or 128 + signal number for a signal death."""
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.WEXITSTATUS(wait_status)


def become_subreaper() -> None:
    if _prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


class Reaper:
    def __init__(self) -> None:
        self._waiters: dict[int, list[asyncio.Future[int]]] = {}
        # Exits nobody waited for yet: pid -> (monotonic time reaped, exit code). A container
        # init can exit before the shim has read its pid file; the timestamp guards against
        # a stale entry matching a later process that reused the pid.
        self._unclaimed: collections.OrderedDict[int, tuple[float, int]] = collections.OrderedDict()
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self.reap()

    def wait_for(self, pid: int, since: float = 0.0) -> asyncio.Future[int]:
        """Future for the exit code of `pid`, including an exit reaped after `since`."""
        loop = self._loop or asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        entry = self._unclaimed.pop(pid, None)
        if entry is not None and entry[0] >= since:
            future.set_result(entry[1])
            return future
        self._waiters.setdefault(pid, []).append(future)
        # The exit may already be pending with the signal handler not yet run.
        self.reap()
        return future

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except InterruptedError:
                continue
            if pid == 0:
                return
            self._deliver(pid, exit_code(status))

    def _deliver(self, pid: int, code: int) -> None:
        waiters = self._waiters.pop(pid, None)
        if not waiters:
            self._unclaimed[pid] = (time.monotonic(), code)
            while len(self._unclaimed) > _UNCLAIMED_LIMIT:
                self._unclaimed.popitem(last=False)
            return
        for future in waiters:
            if not future.done():
                future.set_result(code)
