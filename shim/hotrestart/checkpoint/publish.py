"""Compress, hash, seal and publish dumped checkpoints in the background.

A dump returns as soon as CRIU is done; the rest happens here while the shim stays up
(`drain`). A checkpoint published after a newer one of the same identity is dropped, so a
slow periodic publish never overrides a stop-time checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections.abc import Coroutine
from typing import Any

from hotrestart import telemetry
from hotrestart.checkpoint import workarea
from hotrestart.checkpoint.dumped import Dumped
from hotrestart.checkpoint.files import RAW
from hotrestart.store import archive
from hotrestart.store.backend import Backend
from hotrestart.store.manifest import FileEntry, Identity

log = logging.getLogger(__name__)


class Publisher:
    def __init__(self, store: Backend) -> None:
        self._store = store
        self._background: set[asyncio.Task[None]] = set()
        self._newest: dict[str, float] = {}  # identity -> wall time of its newest successful dump here
        self._in_flight: dict[str, tuple[str, str]] = {}  # checkpoint id -> (identity, reason)
        self._lock = asyncio.Lock()

    def dumped(self, identity: Identity) -> None:
        """A dump of `identity` succeeded now: anything dumped before it may not be published after."""
        self._newest[identity.canonical()] = time.time()

    def publish_later(self, dumped: Dumped) -> asyncio.Task[None]:
        """Compress, hash and publish `dumped` in the background (the shim waits for it on exit)."""
        return self._track(self._publish(dumped))

    def publishing(self, identity: Identity, reason: str) -> bool:
        """A checkpoint of `identity` taken here for `reason` is still being compressed or published."""
        return (identity.canonical(), reason) in self._in_flight.values()

    def retire(self, identity: Identity, reasons: tuple[str, ...]) -> None:
        """Drop the restore points of `identity` taken for `reasons` (a clean exit ends them);
        in a pool, only this pod's (the other members belong to replicas still at work)."""
        self.dumped(identity)
        for entry in self._store.published(identity):
            manifest = entry.manifest
            if manifest is None or manifest.reason not in reasons:
                continue
            if identity.pool and manifest.identity.pod != identity.pod:
                continue
            self._store.remove(entry)

    def discard(self, dumped: Dumped) -> None:
        """Throw a dump away unpublished."""
        if dumped.early is not None:
            dumped.early.close()
        workarea.drop(dumped.work, dumped.tmpfs)
        self._store.discard(dumped.staging)
        self._store.clear_pending(dumped.manifest.identity, dumped.id)

    async def drain(self, timeout: float) -> None:
        if self._background:
            await asyncio.wait(list(self._background), timeout=timeout)

    def _track(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _publish(self, dumped: Dumped) -> None:
        manifest = dumped.manifest
        identity = manifest.identity.canonical()
        self._in_flight[dumped.id] = (identity, manifest.reason)
        try:
            t0 = time.monotonic()
            with telemetry.span("hotrestart.checkpoint.compress", checkpoint=dumped.id) as sp:
                manifest.files = await asyncio.to_thread(_compress_all, dumped)
                sp.set("raw_bytes", manifest.raw_bytes)
                sp.set("stored_bytes", manifest.stored_bytes)
            manifest.timings["compress"] = time.monotonic() - t0
            t1 = time.monotonic()
            async with self._lock:
                if self._newest.get(identity, 0.0) > manifest.created_at:
                    # A later checkpoint (or a clean exit) of the same container came first.
                    log.info("checkpoint %s of %s superseded; dropped", dumped.id, identity)
                    self._store.discard(dumped.staging)
                    return
                with telemetry.span("hotrestart.checkpoint.publish", checkpoint=dumped.id):
                    manifest.timings["durable"] = time.monotonic() - dumped.started
                    sealer = dumped.seals.sealer if dumped.seals is not None else None
                    published = await asyncio.to_thread(self._store.publish, dumped.staging, manifest, sealer)
            if published is None:
                log.info("checkpoint %s of %s is older than the published one; dropped", dumped.id, identity)
                return
            manifest.timings["publish"] = time.monotonic() - t1
            log.info(
                "checkpoint %s of %s published: %d bytes (%d raw) in %.2fs",
                dumped.id,
                identity,
                manifest.stored_bytes,
                manifest.raw_bytes,
                time.monotonic() - dumped.started,
            )
        except Exception as exc:
            # The dump itself succeeded (a stopped container's processes are gone): say so
            # loudly, since nothing else will.
            log.error("checkpoint %s of %s (%s) could not be published: %s", dumped.id, identity, manifest.reason, exc)
            self._store.discard(dumped.staging)
        finally:
            self._in_flight.pop(dumped.id, None)
            if dumped.early is not None:
                dumped.early.close()
            workarea.drop(dumped.work, dumped.tmpfs)
            self._store.clear_pending(manifest.identity, dumped.id)


def _compress_all(dumped: Dumped) -> list[FileEntry]:
    for sub in ("images", "volumes"):
        os.makedirs(os.path.join(dumped.staging, sub), mode=0o700, exist_ok=True)
        os.chmod(os.path.join(dumped.staging, sub), 0o700)
    done = dumped.early.finish() if dumped.early is not None else {}
    seals = dumped.seals
    entries = [
        done.get(src)
        or archive.compress_file(
            src, os.path.join(dumped.staging, rel), rel, seal=seals.file(rel) if seals is not None else None
        )
        for src, rel in dumped.files
    ]
    shutil.rmtree(os.path.join(dumped.staging, RAW), ignore_errors=True)
    return seals.ordered(entries) if seals is not None else entries
