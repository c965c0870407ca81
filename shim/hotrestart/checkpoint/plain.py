"""Checkpointing of a container without hot restart: what runc-v2 does, and nothing more.

Task.Checkpoint runs `runc checkpoint` into the folder containerd gives (GPU-aware and
vfork-safe, see `quiesce`) and attests the images there when the node has a store key;
images given at create restore only as `attested` allows; stops deliver their signal,
other creates start cold.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
from collections.abc import AsyncIterator, Collection

from hotrestart.checkpoint import attested, quiesce
from hotrestart.checkpoint.attested import ArchivePolicy
from hotrestart.container.seam import CheckpointConfig, NoCheckpoints, View
from hotrestart.errors import RuntimeCommandError
from hotrestart.gpu.state import GpuState
from hotrestart.runtime import cgroups
from hotrestart.runtime.runc import CheckpointOpts
from hotrestart.store.seal import SealError

log = logging.getLogger(__name__)


class PlainCheckpoints(NoCheckpoints):
    """The `Checkpointing` of a container with hot restart off."""

    def __init__(
        self,
        view: View,
        gpu: GpuState | None = None,
        *,
        gpu_lock_timeout: float | None = None,
        archives: ArchivePolicy | None = None,
    ) -> None:
        super().__init__(view)
        self.gpu = gpu
        self.gpu_lock_timeout = gpu_lock_timeout
        self.archives = archives or ArchivePolicy()
        self._admitted = ""  # the checked copy of images given at create, until restored
        # Restored from images nothing vouched for (AllowUnauthenticatedArchives): its state is
        # never attested nor sealed into the store, where it would pass for this shim's own.
        self.untrusted = False
        # One dump at a time per container (stop, API, periodic), and none under pause/resume.
        self.dump_lock = asyncio.Lock()

    async def admit_images(self, path: str) -> str:
        # Beside the given folder (containerd's container root, on disk), not in the bundle
        # (containerd's state folder, often a tmpfs); a name nobody can have made before.
        parent = os.path.dirname(os.path.abspath(path))
        self._admitted = os.path.join(parent, f".hotrestart-images-{secrets.token_hex(8)}")
        copying = asyncio.ensure_future(
            asyncio.to_thread(attested.admit, path, self._admitted, self.archives, self.view.spec)
        )
        try:
            admitted = await asyncio.shield(copying)
        except asyncio.CancelledError:
            # The copy runs on in its thread: wait for it, so that removing it is final.
            with contextlib.suppress(Exception):
                await copying
            self._drop_admitted()
            raise
        except BaseException:
            self._drop_admitted()
            raise
        self.untrusted = not admitted.authenticated
        return admitted.path

    async def finish_restore(self) -> None:
        """After a restore from containerd's images: GPU processes get their device state back."""
        self._drop_admitted()
        if self.gpu is not None:
            await self.gpu.after_restore(cgroups.procs(self.view.pid))

    def closed(self) -> None:
        self._drop_admitted()

    def _drop_admitted(self) -> None:
        if self._admitted:
            shutil.rmtree(self._admitted, ignore_errors=True)
            self._admitted = ""

    async def attest(self, path: str, names: Collection[str]) -> None:
        """Attest the images `names` just written to `path` for a restore from an archive
        (see `attested`); without a store key they go unattested, and such archives restore
        only where unauthenticated ones are allowed."""
        if self.untrusted:
            log.warning("%s: checkpoint images not attested: restored from unauthenticated images", self.view.id)
            return
        try:
            ring = self.archives.keys()
        except (SealError, OSError) as exc:
            log.warning("%s: checkpoint images not attested: the store key cannot be loaded: %s", self.view.id, exc)
            return
        if ring is not None:
            await asyncio.to_thread(attested.attest, path, ring, self.view.spec, self.view.id, names)

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
            before = set(os.listdir(cfg.path)) if os.path.isdir(cfg.path) else set()
            async with self.dump_lock, self.prepared(cfg.exit) as prep, prep.freeze():
                await view.runc.checkpoint(view.id, opts)
            # Only what CRIU wrote: a file that was there before is not this shim's to vouch for.
            await self.attest(cfg.path, set(os.listdir(cfg.path)) - before)
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
