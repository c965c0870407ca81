"""Store and publish dumped checkpoints in the background: only chunks the store lacks are written.

A dump returns as soon as CRIU is done; the rest happens here while the shim stays up
(`drain`). A checkpoint published after a newer one of the same identity is dropped, so a
slow periodic publish never overrides a stop-time checkpoint.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import shutil
import time
from collections.abc import Coroutine, Mapping
from typing import Any

from hotrestart import telemetry
from hotrestart.checkpoint import flatten, workarea
from hotrestart.checkpoint.dumped import Dumped
from hotrestart.checkpoint.files import RAW
from hotrestart.checkpoint.follow import Followed
from hotrestart.checkpoint.storecalls import StoreCalls
from hotrestart.checkpoint.tracking import PARENT_LINK, Parent
from hotrestart.errors import CheckpointError
from hotrestart.store import chunking
from hotrestart.store.backend import Backend
from hotrestart.store.chunking import Span
from hotrestart.store.chunkwrite import ChunkWriter
from hotrestart.store.manifest import Chunk, FileEntry, Identity

log = logging.getLogger(__name__)


class Publisher:
    def __init__(self, store: Backend, calls: StoreCalls) -> None:
        self._store = store
        self._calls = calls
        self._background: set[asyncio.Task[None]] = set()
        self._newest: dict[str, float] = {}  # identity -> wall time of its newest successful dump here
        self._in_flight: dict[str, tuple[str, str]] = {}  # checkpoint id -> (identity, reason)
        # identity -> (wall time, reasons) of the last retire of its restore points
        self._retired: dict[str, tuple[float, tuple[str, ...]]] = {}
        self._lock = asyncio.Lock()

    def dumped(self, identity: Identity) -> None:
        """A dump of `identity` succeeded now: anything dumped before it may not be published after."""
        self._newest[identity.canonical()] = time.time()

    def _retires(self, identity: str, reason: str, created_at: float) -> bool:
        """A retire after `created_at` covers a checkpoint of `identity` taken for `reason`."""
        at, reasons = self._retired.get(identity, (0.0, ()))
        return at > created_at and reason in reasons

    def publish_later(self, dumped: Dumped) -> asyncio.Task[None]:
        """Store and publish `dumped` in the background (the shim waits for it on exit)."""
        return self._track(self._publish(dumped))

    def publishing(self, identity: Identity, reason: str) -> bool:
        """A checkpoint of `identity` taken here for `reason` is still being compressed or published."""
        return (identity.canonical(), reason) in self._in_flight.values()

    def retire(self, identity: Identity, reasons: tuple[str, ...]) -> None:
        """Drop the restore points of `identity` taken for `reasons` (a clean exit ends them);
        in a pool, only this pod's (the other members belong to replicas still at work)."""
        self.dumped(identity)
        self._retired[identity.canonical()] = (time.time(), reasons)
        self._calls.later(f"restore points of {identity.canonical()} not removed", self._retire, identity, reasons)

    def _retire(self, identity: Identity, reasons: tuple[str, ...]) -> None:
        for entry in self._store.published(identity):
            manifest = entry.manifest
            if manifest is None or manifest.reason not in reasons:
                continue
            if identity.pool and manifest.identity.pod != identity.pod:
                continue
            self._store.remove(entry)

    def discard(self, dumped: Dumped) -> None:
        """Throw a dump away unpublished."""
        if dumped.writer is not None:
            dumped.writer.close()
            dumped.writer = None
        _drop_work(dumped)
        self._calls.later("staging not removed", self._store.discard, dumped.staging)
        self._calls.later("pending marker not cleared", self._store.clear_pending, dumped.manifest.identity, dumped.id)

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
                await asyncio.to_thread(self._store_all, dumped)
                sp.set("raw_bytes", manifest.raw_bytes)
                sp.set("stored_bytes", manifest.stored_bytes)
                sp.set("new_bytes", manifest.new_bytes)
            manifest.timings["compress"] = time.monotonic() - t0
            t1 = time.monotonic()
            async with self._lock:
                if self._newest.get(identity, 0.0) > manifest.created_at:
                    # A later checkpoint (or a clean exit) of the same container came first.
                    log.info("checkpoint %s of %s superseded; dropped", dumped.id, identity)
                    await self._calls.call(self._store.discard, dumped.staging)
                    return
                with telemetry.span("hotrestart.checkpoint.publish", checkpoint=dumped.id):
                    manifest.timings["durable"] = time.monotonic() - dumped.started
                    published = await asyncio.to_thread(self._store.publish, dumped.staging, manifest, dumped.sealer)
                if published is not None and self._retires(identity, manifest.reason, manifest.created_at):
                    # The job ended cleanly while this was published, and the retire may have
                    # listed the store before it landed: no restore point, and gone before its
                    # pending marker clears for a create waiting on it.
                    log.info("checkpoint %s of %s retired while published; removed", dumped.id, identity)
                    try:
                        await self._calls.call(self._store.remove, published)
                    except OSError as exc:
                        log.warning("retired checkpoint %s of %s not removed: %s", dumped.id, identity, exc)
                    return
            if published is None:
                log.info("checkpoint %s of %s is older than the published one; dropped", dumped.id, identity)
                return
            manifest.timings["publish"] = time.monotonic() - t1
            if dumped.tracking is not None and dumped.link is not None:
                dumped.tracking.published(dumped.link, dumped.images, published)
            log.info(
                "checkpoint %s of %s published: %d bytes (%d raw), %d of them new, in %.2fs",
                dumped.id,
                identity,
                manifest.stored_bytes,
                manifest.raw_bytes,
                manifest.new_bytes,
                time.monotonic() - dumped.started,
            )
        except Exception as exc:
            # The dump itself succeeded (a stopped container's processes are gone): say so
            # loudly, since nothing else will.
            log.error("checkpoint %s of %s (%s) could not be published: %s", dumped.id, identity, manifest.reason, exc)
            self._calls.later("staging not removed", self._store.discard, dumped.staging)
        finally:
            self._in_flight.pop(dumped.id, None)
            if dumped.writer is not None:  # never got as far as storing
                dumped.writer.close()
                dumped.writer = None
            _drop_work(dumped)
            self._calls.later("pending marker not cleared", self._store.clear_pending, manifest.identity, dumped.id)

    def _store_all(self, dumped: Dumped) -> None:
        """Store every dumped file as chunks (new ones only) and fill in the manifest."""
        manifest = dumped.manifest
        followed: dict[str, Followed] = {}
        if dumped.follower is not None:
            follower, dumped.follower = dumped.follower, None
            # The dump handed the follower its writer, if it had made one: there is one writer.
            dumped.writer, followed = follower.finish()
        writer, dumped.writer = dumped.writer or self._store.chunk_writer(dumped.staging), None
        try:
            parent = dumped.link.parent if dumped.link is not None else None
            if parent is not None:
                t0 = time.monotonic()
                taken = self._make_whole(dumped.images, parent, writer)
                manifest.timings["whole"] = time.monotonic() - t0
                log.info("checkpoint %s: %d bytes of pages taken from %s", dumped.id, taken, parent.entry.id)
            runs = chunking.page_runs(dumped.images)
            reused = 0
            with concurrent.futures.ThreadPoolExecutor(writer.threads) as pool:
                files = []
                for src, rel in _listed(dumped) if parent is not None else dumped.files:
                    inside = os.path.dirname(src) == dumped.images
                    name = os.path.basename(src)
                    marked, stored = followed[name].of(src) if inside and name in followed else (None, {})
                    cut = chunking.cutter(name, runs if inside else {}, marked)
                    files.append(writer.store_file(src, rel, cut, pool, stored))
                    reused += _reused(files[-1], stored)
            writer.finish()
            if followed:
                log.info("checkpoint %s: %d bytes of pages stored while CRIU wrote them", dumped.id, reused)
        finally:
            writer.close()
        manifest.files = files
        manifest.space = writer.space
        # What this checkpoint added: not the chunks cut on the way that the final cut did not keep.
        used = {c.digest: c.stored for f in files for c in f.chunks}
        manifest.new_bytes = sum(n for digest, n in used.items() if digest in writer.written)
        shutil.rmtree(os.path.join(dumped.staging, RAW), ignore_errors=True)

    def _make_whole(self, images: str, parent: Parent, writer: ChunkWriter) -> int:
        """Put the parent's pages (pinned in `writer` before the dump) into a dump that holds
        only what changed since it."""

        def pages_of(name: str, pages_id: int) -> contextlib.AbstractContextManager[flatten.Reader]:
            return contextlib.closing(self._store.file_reader(parent.entry, f"images/pages-{pages_id}.img.zst"))

        try:
            # Reading the parent can take a while from a bucket: the writer keeps its lease.
            return flatten.flatten_images(images, parent.maps, pages_of, progress=writer.keepalive)
        except ValueError as exc:
            raise CheckpointError(f"cannot be made whole from {parent.entry.id}: {exc}") from None


def _drop_work(dumped: Dumped) -> None:
    """Remove the dump's work folder, once a follower still at it has let go of its files."""
    follower, dumped.follower = dumped.follower, None
    if follower is not None:
        follower.abandon(then=lambda: workarea.drop(dumped.work, dumped.tmpfs))
    else:
        workarea.drop(dumped.work, dumped.tmpfs)


def _reused(entry: FileEntry, stored: Mapping[Span, Chunk]) -> int:
    """Raw bytes of `entry` whose chunks were among `stored`."""
    at, reused = 0, 0
    for chunk in entry.chunks:
        if stored.get((at, chunk.raw)) == chunk:
            reused += chunk.raw
        at += chunk.raw
    return reused


def _listed(dumped: Dumped) -> list[tuple[str, str]]:
    """The dump's files as they are now: making it whole may have written a page image
    CRIU had no page of its own for."""
    names = sorted(n for n in os.listdir(dumped.images) if n != PARENT_LINK)
    others = [(src, rel) for src, rel in dumped.files if os.path.dirname(src) != dumped.images]
    return [(os.path.join(dumped.images, n), f"images/{n}.zst") for n in names] + others
