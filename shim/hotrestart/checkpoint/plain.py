"""Checkpointing of a container without hot restart: what runc-v2 does, and nothing more.

Task.Checkpoint runs `runc checkpoint` into the folder containerd gives (GPU-aware and
vfork-safe, see `quiesce`); stops deliver their signal, creates start cold.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

from hotrestart.checkpoint import quiesce
from hotrestart.container.seam import CheckpointConfig, NoCheckpoints, View
from hotrestart.errors import RuntimeCommandError
from hotrestart.gpu.state import GpuState
from hotrestart.runtime import cgroups
from hotrestart.runtime.runc import CheckpointOpts


class PlainCheckpoints(NoCheckpoints):
    """The `Checkpointing` of a container with hot restart off."""

    def __init__(self, view: View, gpu: GpuState | None = None, *, gpu_lock_timeout: float | None = None) -> None:
        super().__init__(view)
        self.gpu = gpu
        self.gpu_lock_timeout = gpu_lock_timeout
        # One dump at a time per container (stop, API, periodic), and none under pause/resume.
        self.dump_lock = asyncio.Lock()

    async def finish_restore(self) -> None:
        """After a restore from containerd's images: GPU processes get their device state back."""
        if self.gpu is not None:
            await self.gpu.after_restore(cgroups.procs(self.view.pid))

    async def checkpoint(self, cfg: CheckpointConfig) -> None:
        view = self.view
        work = cfg.work_path or os.path.join(view.bundle, "criu-work")
        os.makedirs(work, mode=0o700, exist_ok=True)
        opts = CheckpointOpts(
            image_path=cfg.path,
            work_path=work,
            leave_running=not cfg.exit,
            tcp_established=cfg.open_tcp,
            ext_unix_sk=cfg.external_unix_sockets,
            shell_job=cfg.terminal or view.terminal,
            file_locks=cfg.file_locks,
            empty_ns=cfg.empty_namespaces,
            manage_cgroups_mode=cfg.cgroups_mode,
        )
        try:
            async with self.dump_lock, self.prepared(cfg.exit) as prep, prep.freeze():
                await view.runc.checkpoint(view.id, opts)
        except RuntimeCommandError as exc:
            dump_log = os.path.join(work, "dump.log")
            if os.path.exists(dump_log):
                target = os.path.join(view.bundle, "criu-dump.log")
                with contextlib.suppress(OSError):
                    os.replace(dump_log, target)
                raise RuntimeCommandError(exc.argv, exc.returncode, f"{exc.detail} (see {target})", exc.verb) from exc
            raise

    def prepared(self, exits: bool) -> contextlib.AbstractAsyncContextManager[quiesce.Prepared]:
        return quiesce.prepared(self.view, self.gpu, exits=exits, lock_timeout=self.gpu_lock_timeout)

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self.dump_lock:
            yield
