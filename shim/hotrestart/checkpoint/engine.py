"""What every container's checkpoints share within one shim: the store, the work areas, the
node's runtime versions, GPU state and the background publisher.

One engine serves every container of a store; each container's hot restart (`hot.py`)
holds its own policy and state and asks the engine's modules to dump (`dump.py`), publish
(`publish.py`) and restore (`restore.py`).
"""

from __future__ import annotations

import asyncio
import logging
import platform
import socket

from hotrestart.checkpoint import workarea
from hotrestart.checkpoint.publish import Publisher
from hotrestart.checkpoint.storecalls import StoreCalls
from hotrestart.gpu.state import GpuState
from hotrestart.runtime import criu
from hotrestart.runtime.command import CommandRunner
from hotrestart.runtime.runc import Runc
from hotrestart.store.backend import Backend
from hotrestart.store.config import StoreSource

log = logging.getLogger(__name__)


class Engine:
    def __init__(
        self,
        runner: CommandRunner,
        store: Backend,
        *,
        work: workarea.Places | None = None,
        node: str = "",
        gpu: GpuState | None = None,
        source: StoreSource | None = None,
    ) -> None:
        self.runner = runner
        self.store = store
        self.gpu = gpu
        self.source = source  # for helper processes (a lazy restore's page server); None: none
        self.work = work if work is not None else workarea.Places.from_env()
        self.node = node or socket.gethostname()
        self.calls = StoreCalls(store)
        self.publisher = Publisher(store, self.calls)
        self._runtime: dict[str, str] | None = None
        self._lazy: bool | None = None
        self._tracking: bool | None = None
        self._winding_down: set[asyncio.Future[None]] = set()
        # Work folders of shims that were killed hold process memory, often on tmpfs.
        workarea.sweep_all(self.work)

    async def runtime_info(self, runc: Runc) -> dict[str, str]:
        """The versions a checkpoint records and a restore must match."""
        if self._runtime is None:
            runc_version = ""
            try:
                runc_version = await runc.version()
            except OSError:
                pass
            self._runtime = {
                "runc": runc_version,
                "criu": await criu.version(self.runner),
                "kernel": platform.release(),
                "arch": platform.machine(),
            }
        return self._runtime

    async def lazy_restores(self, runc: Runc) -> bool:
        """Whether CRIU and the kernel here can restore lazily (userfaultfd with the
        non-cooperative events CRIU needs); asked once."""
        if self.source is None:
            return False  # no way for a page server to open the store
        if self._lazy is None:
            self._lazy = await self._criu_has(runc, "uffd-noncoop", "restores are full ones here: no lazy pages")
        return self._lazy

    async def memory_tracking(self, runc: Runc) -> bool:
        """Whether CRIU and the kernel here track the pages written to between dumps
        (soft-dirty), so that a dump can write only those; asked once."""
        if self._tracking is None:
            if platform.machine() != "x86_64":  # a dump is made whole by reading x86-64 registers
                log.info("every dump reads all memory here (incremental dumps are made on x86-64 only)")
                self._tracking = False
            else:
                self._tracking = await self._criu_has(runc, "mem_dirty_track", "every dump reads all memory here")
        return self._tracking

    async def _criu_has(self, runc: Runc, feature: str, without: str) -> bool:
        try:
            result = await self.runner.run(criu.check_argv(runc.criu, feature), timeout=30)
            found = result.returncode == 0
            why = (result.stdout + result.stderr).decode(errors="replace").strip().splitlines()[-1:]
        except (OSError, TimeoutError) as exc:
            found, why = False, [str(exc)]
        if not found:
            log.info("%s (%s)", without, "; ".join(why) or "criu check failed")
        return found

    def wind_down(self, task: asyncio.Future[None]) -> None:
        """Cancel `task` and have `drain` wait for it: a dump cancelled part-way still has
        a work folder (often a tmpfs mount) to remove."""
        task.cancel()
        self._winding_down.add(task)
        task.add_done_callback(self._winding_down.discard)

    async def drain(self, timeout: float = 600.0) -> None:
        """Wait for background publishes and cancelled dumps (the shim must not exit under them)."""
        if self._winding_down:
            await asyncio.wait(list(self._winding_down), timeout=timeout)
        await self.publisher.drain(timeout)
        await self.calls.drain(timeout)
