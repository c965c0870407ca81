"""Get a container ready for a dump: GPU state to the host first, then a freeze CRIU can use.

GPU processes are locked and checkpointed before anything freezes them (a lock after a
freeze hangs); a container containerd paused is thawed for that and paused again at the
end. The freeze itself (`Prepared.freeze`) is entered by the caller around the capture and
`runc checkpoint` alone, so that work folders and the like are made while the application
still runs. After a leave-running dump, or any failure, GPU state is resumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from hotrestart.container.seam import View
from hotrestart.gpu.state import GpuState
from hotrestart.runtime import cgroups

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Prepared:
    gpu: dict[str, Any]  # the manifest's record of GPU state ({} without GPU processes)
    freeze: Callable[[], contextlib.AbstractAsyncContextManager[None]]


@contextlib.asynccontextmanager
async def prepared(
    view: View, gpu: GpuState | None, *, exits: bool, lock_timeout: float | None = None
) -> AsyncIterator[Prepared]:
    paused = view.paused
    where = cgroups.freezer_of(view.pid)  # found now: the process may die before the thaw
    # The cgroup's list, not `runc ps`: this runs before every dump, stops included.
    suspension = await gpu.find(cgroups.procs(view.pid)) if gpu is not None else None
    if suspension is None or gpu is None:
        yield Prepared({}, lambda: quiesced(view, exits=exits, keep_frozen=paused))
        return
    if paused:
        cgroups.thaw(view.pid, where)
    try:
        await gpu.suspend(suspension, int(lock_timeout * 1000) if lock_timeout is not None else None)
    except BaseException:
        if paused:
            await asyncio.to_thread(cgroups.freeze_quiescent, view.pid)
        raise
    ok = False
    try:
        if suspension.owner == "shim":
            yield Prepared(suspension.record, lambda: quiesced(view, exits=exits, keep_frozen=False))
        else:  # CRIU's CUDA plugin locks first and freezes by itself
            yield Prepared(suspension.record, _no_freeze)
        ok = True
    finally:
        if not (exits and ok):
            cgroups.thaw(view.pid, where)
            await gpu.resume(suspension, quiet=True)
            if paused:
                await asyncio.to_thread(cgroups.freeze_quiescent, view.pid)


@contextlib.asynccontextmanager
async def quiesced(view: View, *, exits: bool, keep_frozen: bool) -> AsyncIterator[None]:
    """Hand CRIU the container frozen with every process seizable; thaw it afterwards
    unless it is to stay frozen (containerd pauses a task around its own checkpoint).

    A freeze, CRIU's own or containerd's pause, can catch a process in the middle of
    vfork(); CRIU then waits out its whole timeout and fails. See cgroups.freeze_quiescent."""
    pid = view.pid
    where = cgroups.freezer_of(pid)  # the thaw must find it if the process dies meanwhile
    freezing = asyncio.ensure_future(asyncio.to_thread(cgroups.freeze_quiescent, pid))
    try:
        if not await asyncio.shield(freezing):
            log.info("%s: a process stays inside vfork(); dumping anyway", view.id)
    except asyncio.CancelledError:
        # The freezing thread runs on; never leave its freeze behind.
        await asyncio.wait([freezing])
        cgroups.thaw(pid, where)
        raise
    try:
        yield
    finally:
        if exits or not keep_frozen:
            cgroups.thaw(pid, where)


@contextlib.asynccontextmanager
async def _no_freeze() -> AsyncIterator[None]:
    yield
