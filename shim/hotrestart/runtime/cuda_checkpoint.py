"""NVIDIA's `cuda-checkpoint` command line, built here and nowhere else.

The tool moves a process's device memory into its host memory and releases the GPU
(lock, then checkpoint), after which CRIU can dump it; restore and unlock reverse that.
Every invocation pays the driver's initialisation (seconds on real hardware), so callers
combine steps where the state machine allows: one `--toggle` takes a checkpointed process
back to running when no device map is needed.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping

from hotrestart.errors import CheckpointError
from hotrestart.runtime.command import CommandRunner

BINARY = "cuda-checkpoint"
BINARY_ENV = "HOTRESTART_CUDA_CHECKPOINT"  # a configured path; PATH otherwise

STATES = ("running", "locked", "checkpointed", "failed")


def find_binary() -> str:
    """The cuda-checkpoint to use, or "" when the node has none."""
    configured = os.environ.get(BINARY_ENV, "")
    if configured:
        return configured if os.access(configured, os.X_OK) else ""
    return shutil.which(BINARY) or ""


class CudaCheckpoint:
    def __init__(self, runner: CommandRunner, binary: str) -> None:
        self._runner = runner
        self.binary = binary

    # -- argv -------------------------------------------------------------------------------

    def state_argv(self, pid: int) -> list[str]:
        return [self.binary, "--get-state", "--pid", str(pid)]

    def action_argv(
        self, action: str, pid: int, *, timeout_ms: int = 0, device_map: Mapping[str, str] = {}
    ) -> list[str]:
        argv = [self.binary, "--action", action, "--pid", str(pid)]
        if action == "lock" and timeout_ms:
            argv += ["--timeout", str(timeout_ms)]
        if action == "restore" and device_map:
            argv += ["--device-map", ",".join(f"{old}={new}" for old, new in sorted(device_map.items()))]
        return argv

    def toggle_argv(self, pid: int) -> list[str]:
        return [self.binary, "--toggle", "--pid", str(pid)]

    # -- calls ------------------------------------------------------------------------------

    async def state(self, pid: int) -> str:
        out = await self._check(self.state_argv(pid))
        state = out.strip().lower()
        if state not in STATES:
            raise CheckpointError(f"cuda-checkpoint reported an unknown state {state!r} for pid {pid}")
        return state

    async def action(self, action: str, pid: int, *, timeout_ms: int = 0, device_map: Mapping[str, str] = {}) -> None:
        await self._check(self.action_argv(action, pid, timeout_ms=timeout_ms, device_map=device_map))

    async def toggle(self, pid: int) -> None:
        await self._check(self.toggle_argv(pid))

    async def _check(self, argv: list[str]) -> str:
        result = await self._runner.run(argv)
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).decode(errors="replace").strip().splitlines()
            raise CheckpointError(f"{' '.join(argv[1:])}: {detail[-1] if detail else f'exit {result.returncode}'}")
        return result.stdout.decode(errors="replace")
