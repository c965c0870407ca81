"""Carrying a container's GPU state through a checkpoint with cuda-checkpoint.

Exactly one owner of GPU state: when the installed CRIU loads its CUDA plugin (and the node
has the driver), CRIU locks, checkpoints and restores GPU processes itself and the shim only
records them; otherwise the shim drives cuda-checkpoint, all processes of a container in
parallel:

    suspend:  lock (with a timeout) -> checkpoint      before anything freezes them
    resume:   toggle (restore + unlock in one call), or restore --device-map + unlock

Any failure part-way leaves the workload as it was: checkpointed processes are restored,
locked ones unlocked, and the caller's checkpoint fails (a stop then stops the ordinary way).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from hotrestart.errors import CheckpointError
from hotrestart.gpu import plan
from hotrestart.gpu.inventory import Inventory, node_inventory
from hotrestart.runtime import meminfo
from hotrestart.runtime.command import CommandRunner
from hotrestart.runtime.cuda_checkpoint import CudaCheckpoint, find_binary

log = logging.getLogger(__name__)

DEFAULT_LOCK_TIMEOUT_MS = 10_000


@dataclasses.dataclass
class Suspension:
    """The GPU processes of one dump, and who carries their state."""

    pids: list[int]
    owner: str  # "shim" or "criu-plugin"
    record: dict[str, Any]


class GpuState:
    def __init__(
        self,
        runner: CommandRunner,
        *,
        criu_binary: str = "criu",
        inventory: Callable[[], Inventory | None] = node_inventory,
        tool: CudaCheckpoint | None = None,
        lock_timeout_ms: int = DEFAULT_LOCK_TIMEOUT_MS,
    ) -> None:
        self._runner = runner
        self._criu = criu_binary
        self._inventory = inventory
        self._tool = tool
        self.lock_timeout_ms = lock_timeout_ms

    def tool(self) -> CudaCheckpoint | None:
        if self._tool is None:
            binary = find_binary()
            if binary:
                self._tool = CudaCheckpoint(self._runner, binary)
        return self._tool

    def owner(self) -> str:
        """Who carries GPU state on this node: "criu-plugin", "shim", or "" (nobody can)."""
        if plan.criu_cuda_plugin(self._criu):
            return "criu-plugin"
        return "shim" if self.tool() is not None else ""

    async def inventory(self) -> Inventory | None:
        return await asyncio.to_thread(self._inventory)

    async def find(self, container_pids: Iterable[int]) -> Suspension | None:
        """The container's GPU processes, or None when it has none. Raises when they cannot be
        checkpointed here (no cuda-checkpoint, or not enough host memory to stage them)."""
        pids_in = list(container_pids)
        inventory = await self.inventory()
        pids = await asyncio.to_thread(plan.gpu_pids, pids_in, inventory)
        if not pids:
            return None
        owner = self.owner()
        if not owner:
            raise CheckpointError(f"processes {pids} use the GPU but this node has no cuda-checkpoint")
        problem = plan.host_memory_problem(plan.device_memory_in_use(pids, inventory), meminfo.available())
        if problem:
            raise CheckpointError(problem)
        return Suspension(pids, owner, plan.record(pids, inventory, owner))

    async def suspend(self, s: Suspension, lock_timeout_ms: int | None = None) -> None:
        """Lock, then checkpoint every GPU process (the shim's part only)."""
        lock_ms = self.lock_timeout_ms if lock_timeout_ms is None else lock_timeout_ms
        if s.owner != "shim":
            return
        tool = self._require_tool()

        async def step(action: str, pid: int) -> int:
            try:
                await tool.action(action, pid, timeout_ms=lock_ms if action == "lock" else 0)
            except CheckpointError:
                if not await asyncio.to_thread(plan.maps_libcuda, pid):
                    return 0  # it exited or exec'd meanwhile: no GPU state to carry
                raise
            return pid

        try:
            for action in ("lock", "checkpoint"):
                results = await asyncio.gather(*(step(action, pid) for pid in s.pids), return_exceptions=True)
                s.pids = [r for r in results if isinstance(r, int) and r] + [
                    pid for pid, r in zip(s.pids, results, strict=True) if isinstance(r, BaseException)
                ]
                for r in results:
                    if isinstance(r, BaseException):
                        raise r
        except BaseException as exc:
            await self.resume(s, quiet=True)
            if isinstance(exc, CheckpointError):
                raise CheckpointError(f"GPU state could not be checkpointed: {exc}") from exc
            raise

    async def resume(self, s: Suspension, device_map: Mapping[str, str] = {}, *, quiet: bool = False) -> None:
        """Take every process back to running from wherever it is (checkpointed or locked)."""
        if s.owner != "shim":
            return
        try:
            await _all(self._resume_one(pid, device_map) for pid in s.pids)
        except CheckpointError as exc:
            if not quiet:
                raise
            log.error("GPU processes %s could not be resumed: %s", s.pids, exc)

    async def _resume_one(self, pid: int, device_map: Mapping[str, str]) -> None:
        try:
            await self._resume_state(pid, device_map)
        except CheckpointError:
            # A short-lived child (a restored `sleep`) may exit before it is resumed: nothing
            # of its GPU state is left to lose, and the restore must not fail for it.
            if not await asyncio.to_thread(plan.maps_libcuda, pid):
                log.info("GPU process %d exited before it was resumed", pid)
                return
            raise

    async def _resume_state(self, pid: int, device_map: Mapping[str, str]) -> None:
        tool = self._require_tool()
        state = await tool.state(pid)
        if state == "checkpointed" and not device_map:
            await tool.toggle(pid)
        elif state == "checkpointed":
            await tool.action("restore", pid, device_map=device_map)
            await tool.action("unlock", pid)
        elif state == "locked":
            await tool.action("unlock", pid)
        elif state == "failed":
            raise CheckpointError(f"GPU state of pid {pid} failed (uncorrectable)")

    async def after_restore(self, container_pids: Iterable[int], device_map: Mapping[str, str] = {}) -> list[int]:
        """Resume the GPU state of restored processes (their new host pids); returns them."""
        pids = [pid for pid in container_pids if plan.maps_libcuda(pid)]
        if not pids or self.owner() != "shim":
            return pids
        await self.resume(Suspension(pids, "shim", {}), device_map)
        return pids

    def _require_tool(self) -> CudaCheckpoint:
        tool = self.tool()
        if tool is None:
            raise CheckpointError("no cuda-checkpoint on this node")
        return tool


async def _all(calls: Iterable[Any]) -> None:
    """Run calls in parallel; wait for all of them, then raise the first failure."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
