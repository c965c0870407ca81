"""Dump a container with CRIU (through `runc checkpoint`) and capture its files.

The images go to a private work area (tmpfs when the node has the memory, see
`workarea`); the files are captured inside the freeze, before the dump ends a stopping
container, so a capture that fails leaves it running to be signalled. Nothing is
published here (`publish.py`); a failure leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from hotrestart import telemetry
from hotrestart.checkpoint import files, workarea
from hotrestart.checkpoint.compat import image_of, spec_digest
from hotrestart.checkpoint.dumped import Dumped, DumpRequest
from hotrestart.checkpoint.engine import Engine
from hotrestart.checkpoint.follow import Follower, follow_threads
from hotrestart.checkpoint.policy import Policy
from hotrestart.checkpoint.tracking import PARENT_LINK, Link, Tracking
from hotrestart.container.seam import View
from hotrestart.errors import CheckpointError
from hotrestart.runtime import netinfo
from hotrestart.runtime.runc import CheckpointOpts
from hotrestart.store.backend import Backend
from hotrestart.store.chunkwrite import ChunkWriter
from hotrestart.store.manifest import Manifest

log = logging.getLogger(__name__)

Around = Callable[[], AbstractAsyncContextManager[None]]


async def dump(
    engine: Engine,
    view: View,
    policy: Policy,
    req: DumpRequest,
    budget: float | None,
    *,
    around: Around | None = None,
    gpu: dict[str, Any] | None = None,
    tracking: Tracking | None = None,
    incremental: bool = True,
) -> Dumped:
    """CRIU-dump `view`'s container and capture its files within `budget` seconds. The
    process tree is frozen only for the dump itself (`around` wraps exactly the capture and
    `runc checkpoint`: the caller's freeze). With `tracking` (the container's chain of
    dumps, where the kernel tracks soft-dirty pages), the dump is taken with memory tracking
    and, when `incremental` and there is a parent, holds only what changed since it (made
    whole when published). Raises on failure, leaving nothing behind."""
    t0 = time.monotonic()
    runtime = await engine.runtime_info(view.runc)
    if not runtime.get("criu"):
        raise CheckpointError("no CRIU on this node")
    store = engine.store
    cid, staging = store.new_staging()
    sealer = store.sealer(cid)
    engine.calls.later("pending marker not set", store.mark_pending, policy.identity, cid)
    usage = memory_usage(view.pid)
    # GPU state reaches host memory through DMA, which soft-dirty tracking may not see.
    incremental = incremental and tracking is not None and tracking.has_parent() and not (gpu or {}).get("processes")
    # Made whole, a dump holds all of the memory again beside the changes CRIU wrote: room
    # for both. CRIU writes only the changes while the process is frozen: nothing to prefault.
    work, tmpfs = workarea.make(
        engine.work, cid, usage, prefault=req.leave_running and not incremental, extra=usage if incremental else 0
    )
    net = asyncio.ensure_future(asyncio.to_thread(netinfo.addresses, netinfo.netns_path(view.spec)))
    timings: dict[str, float] = {}
    link: Link | None = None
    writer: ChunkWriter | None = None
    follower: Follower | None = None
    try:
        if tracking is not None:
            link = tracking.begin(work, incremental)
            if link.parent is not None:
                writer, link = await asyncio.to_thread(secure_parent, store, staging, link)
        images = os.path.join(work, "images")
        opts = CheckpointOpts(
            image_path=images,
            work_path=os.path.join(work, "criu"),
            parent_path=link.parent_path(images) if link is not None else "",
            leave_running=req.leave_running,
            tcp_established=req.tcp_established,
            ext_unix_sk=req.ext_unix_sk,
            shell_job=view.terminal,
            file_locks=req.file_locks,
            empty_ns=req.empty_ns,
            manage_cgroups_mode=req.cgroups_mode,
        )
        if not req.leave_running and (link is None or link.parent is None):
            # A stop: what counts is when the checkpoint is durable (see `follow`).
            # A parent dropped since (its checkpoint gone) leaves its writer: the follower takes it.
            follower, writer = Follower(store, staging, images, follow_threads(store), writer=writer).start(), None
        log.info("%s: dump %s (%s) begins", view.id, cid, req.reason)
        with telemetry.span("hotrestart.checkpoint.dump", container=view.id, reason=req.reason) as sp:
            outcome = "failed"
            try:
                async with around() if around is not None else contextlib.nullcontext():
                    # Files first, while the processes are frozen (consistent with their
                    # memory) and before the dump ends them.
                    t1 = time.monotonic()
                    with telemetry.span("hotrestart.checkpoint.rootfs_diff", container=view.id) as fsp:
                        captured = await asyncio.to_thread(files.capture, view, policy.carry_volumes, staging)
                        fsp.set("files", len(captured))
                    timings["rootfs_diff"] = time.monotonic() - t1
                    if not store.remote:  # an object store's chunks leave the node
                        room_for(staging, usage)
                    left = None if budget is None else max(t0 + budget - time.monotonic(), 0.1)
                    await view.runc.checkpoint(view.id, opts, timeout=left)
                outcome = "ok"
            except TimeoutError:
                outcome = "timeout"
                raise CheckpointError(f"the dump did not finish within {budget or 0:.1f}s") from None
            finally:
                sp.set("outcome", outcome)
                timings["dump"] = time.monotonic() - t0
                log.info("%s: dump %s (%s) ends: %s after %.2fs", view.id, cid, req.reason, outcome, timings["dump"])
        engine.publisher.dumped(policy.identity)
        # CRIU's link to the parent is neither stored nor handed to containerd: what leaves
        # here is whole (a stored checkpoint once `publish` has made it so).
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(images, PARENT_LINK))
        names = sorted(os.listdir(images))
        dumped_files = [(os.path.join(images, name), f"images/{name}.zst") for name in names]
        dumped_files += captured
    except BaseException:
        net.cancel()
        if writer is not None:
            writer.close()
        _keep_dump_log(view, work)
        if follower is not None:
            follower.abandon(then=lambda: workarea.drop(work, tmpfs))  # once it holds none of its files
        else:
            workarea.drop(work, tmpfs)
        engine.calls.later("staging not removed", store.discard, staging)
        engine.calls.later("pending marker not cleared", store.clear_pending, policy.identity, cid)
        raise
    try:
        async with asyncio.timeout(5):
            addresses = await net
    except Exception as exc:
        log.info("%s: could not read pod addresses: %s", view.id, exc)
        addresses = []
    manifest = Manifest(
        id=cid,
        identity=policy.identity,
        created_at=time.time(),
        node=engine.node,
        reason=req.reason,
        image=image_of(view.spec),
        spec_digest=spec_digest(view.spec),
        runtime=runtime,
        network={"addresses": addresses},
        files=[],
        timings=timings,
        tcp=policy.tcp,
        gpu=gpu or {},
    )
    if link is not None and link.parent is not None:
        log.info("%s: dump %s holds what changed since %s", view.id, cid, link.parent.entry.id)
    return Dumped(
        cid, staging, work, tmpfs, dumped_files, manifest, t0, images, sealer, tracking, link, writer, follower
    )


def secure_parent(store: Backend, staging: str, link: Link) -> tuple[ChunkWriter, Link]:
    """The writer of this checkpoint, with the parent's page chunks recorded in it before
    the dump, so that no collection removes them until it is made whole; and the link, without
    its parent if the parent checkpoint is gone from the store (its chunks may be gone too).
    Recorded first, then looked for: a collection either sees the record or ran before the
    checkpoint was gone."""
    assert link.parent is not None
    writer = store.chunk_writer(staging)
    try:
        stored = link.parent.entry.manifest
        if stored is None:
            return writer, link.without_parent()
        for fe in stored.files:
            if fe.path.startswith("images/pages-"):
                for chunk in fe.chunks:
                    writer.pin(stored.space, chunk.digest)
        if not any(e.id == link.parent.entry.id for e in store.published(stored.identity)):
            log.info("the parent checkpoint %s is gone: this dump reads all memory", link.parent.entry.id)
            return writer, link.without_parent()
    except BaseException:
        writer.close()
        raise
    return writer, link


def memory_usage(pid: int) -> int:
    """Resident memory of the container's cgroup (falls back to the init's RSS)."""
    from hotrestart.runtime.oom import memory_cgroup_dir

    cgroup = memory_cgroup_dir(pid)
    for name in ("memory.usage_in_bytes", "memory.current"):
        with contextlib.suppress(OSError, ValueError, TypeError):
            with open(os.path.join(cgroup or "", name)) as f:
                return int(f.read())
    with contextlib.suppress(OSError, ValueError):
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return 0


def room_for(staging: str, memory: int) -> None:
    """Refuse a dump the store cannot keep: once CRIU has dumped a stopping container its
    processes are gone, and a publish that then fails would lose them unsignalled. Memory
    is the images' size before compression, so this errs on the safe side."""
    st = os.statvfs(staging)
    free = st.f_bavail * st.f_frsize
    if free < memory:
        raise CheckpointError(f"the store has {free >> 20} MiB free and the checkpoint may need {memory >> 20} MiB")


def _keep_dump_log(view: View, work: str) -> None:
    """Keep CRIU's log of a failed dump as <bundle>/criu-dump.log, where runc-v2 puts it."""
    with contextlib.suppress(OSError):
        shutil.copyfile(os.path.join(work, "criu", "dump.log"), os.path.join(view.bundle, "criu-dump.log"))
