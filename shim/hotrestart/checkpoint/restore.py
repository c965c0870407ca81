"""Find, claim, unpack and settle the checkpoint a new container restores from.

The newest compatible checkpoint of the identity is claimed (a rename: exactly one restore
wins), verified while it is decompressed into a private work area, and its files are
replayed onto the new root filesystem and volumes; the container then runs `runc restore`
itself. Every failure quarantines the checkpoint with the reason and CRIU's log; a restore
cancelled part-way gives its claim back.

A pod template's warm snapshot (`template`) is the exception: read where it is published,
never claimed, never consumed, and set aside only when it is proven bad (it fails its
hashes or its seal), never for a failure of one replica's restore.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import signal
import tempfile
import time
from collections.abc import Mapping
from typing import Any

from hotrestart import telemetry
from hotrestart.checkpoint import files, identity, lazy, template, workarea
from hotrestart.checkpoint.compat import incompatibility
from hotrestart.checkpoint.engine import Engine
from hotrestart.checkpoint.policy import Policy
from hotrestart.container.seam import RestoreImages, View
from hotrestart.errors import ShimError, StoreError
from hotrestart.gpu import plan as gpu_plan
from hotrestart.runtime import netinfo
from hotrestart.store import restores
from hotrestart.store.entry import Entry
from hotrestart.store.manifest import FileEntry, Manifest

log = logging.getLogger(__name__)

RESTORE_WINDOW = 30.0  # a restored container that dies sooner counts as a failed restore
MAX_SHORT_RESTORES = 3
PENDING_WAIT = 30.0
MEMORY_SLACK = 64 << 20  # CRIU's images carry some metadata beyond the pages themselves


class RestoreFailed(ShimError):
    """A restore could not complete; the message is the reason shown to the user."""


@dataclasses.dataclass
class Claim:
    """A checkpoint claimed for one restore, and its work area until the restore is done."""

    entry: Entry
    manifest: Manifest
    work: str = ""
    tmpfs: bool = False
    log_file: str = ""
    shared: bool = False  # a template's snapshot: read in place, never claimed or consumed
    daemon: lazy.Daemon | None = None  # a lazy restore's, until every page has arrived
    resident: asyncio.Task[None] | None = None  # follows the lazy restore to its end
    settled: bool = False  # quarantined after the process ran: nothing more to decide
    started_at: float = dataclasses.field(default_factory=time.time)  # wall time the restore began

    def drop_work(self) -> None:
        if self.daemon is not None:
            self.daemon.close()
            self.daemon = None
        if self.work:
            workarea.drop(self.work, self.tmpfs)
            self.work = ""


async def find(engine: Engine, view: View, policy: Policy) -> tuple[Entry | None, str]:
    """The checkpoint to restore `view`'s container from, or (None, why not)."""
    store, calls = engine.store, engine.calls
    # A checkpoint being written (the stop of the previous incarnation) is waited for, at
    # most PENDING_WAIT in all: each look at a remote store takes time of its own.
    deadline = time.monotonic() + PENDING_WAIT
    while time.monotonic() < deadline:
        if not await calls.call(store.is_pending, policy.identity):
            break
        await asyncio.sleep(0.1)  # the marker is another process's (another node's): polled
    if policy.identity.pool:
        entry = _pool_pick(await calls.call(store.candidates, policy.identity), policy)
    else:
        entry = await calls.call(store.latest, policy.identity)
    if entry is None and policy.snapshot is not None and (snap := identity.template_of(policy.identity)):
        # No stopped replica to take over.
        entry = await calls.call(template.current, store, snap, policy.snapshot.ttl)
    if entry is None or entry.manifest is None:
        return None, "no checkpoint"
    reason = await unfit(engine, view, entry.manifest)
    if reason:
        return None, f"checkpoint {entry.id} not compatible: {reason}"
    return entry, ""


async def unfit(engine: Engine, view: View, manifest: Manifest) -> str:
    """Why this checkpoint cannot restore `view`'s container here ("" when it can)."""
    reason = incompatibility(manifest, view.spec, await engine.runtime_info(view.runc))
    reason = reason or beyond_memory_limit(manifest, view.spec)
    if not reason and manifest.gpu.get("processes"):
        _, reason = await _gpu_placement(engine, manifest)
    return reason


def beyond_memory_limit(manifest: Manifest, spec: Mapping[str, Any]) -> str:
    """Why a checkpoint's memory cannot fit the new container's limit ("" when it can): its
    sizes are its writer's word, and nothing beyond the limit is ever decompressed."""
    memory = ((spec.get("linux") or {}).get("resources") or {}).get("memory") or {}
    limit = memory.get("limit") if isinstance(memory, Mapping) else None
    if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
        return ""
    images = sum(f.raw_bytes for f in manifest.files if f.path.startswith("images/"))
    if images > limit + MEMORY_SLACK:
        return f"its memory images ({images >> 20} MiB) exceed the container's memory limit ({limit >> 20} MiB)"
    return ""


async def prepare(engine: Engine, view: View, entry: Entry, policy: Policy) -> tuple[Claim, RestoreImages]:
    """Claim `entry`, verify and unpack it and replay its files, for `runc restore`."""
    shared = template.is_template(entry)
    claimed = entry if shared else await engine.calls.call(engine.store.claim, entry)
    if (claimed is None or claimed.manifest is None) and policy.identity.pool:
        claimed = await _claim_another(engine, view, policy, entry.id)
    if claimed is None or claimed.manifest is None:
        raise RestoreFailed(f"checkpoint {entry.id} was claimed by another restore")
    claim = Claim(claimed, claimed.manifest, shared=shared)
    manifest = claim.manifest
    net = asyncio.ensure_future(asyncio.to_thread(netinfo.addresses, netinfo.netns_path(view.spec)))
    try:
        claim.work, claim.tmpfs = workarea.make(engine.work, f"restore-{entry.id}", manifest.raw_bytes)
        criu_work = os.path.join(claim.work, "criu")
        claim.log_file = os.path.join(criu_work, "restore.log")
        t0 = time.monotonic()
        lazily = policy.lazy and not manifest.gpu.get("processes") and await engine.lazy_restores(view.runc)
        with telemetry.span("hotrestart.restore.verify", checkpoint=entry.id, lazy=lazily) as sp:
            if lazily:
                lazily = await _start_lazy(engine, view, claim, criu_work)
            else:
                await asyncio.to_thread(_decompress_all, engine, claimed, claim.work)
            sp.set("stored_bytes", manifest.stored_bytes)
        t1 = time.monotonic()
        with telemetry.span("hotrestart.restore.rootfs_apply", checkpoint=entry.id):
            await files.replay(view, manifest, claim.work)
        try:
            async with asyncio.timeout(5):
                addresses = await net
        except Exception:
            addresses = []
        keep_tcp = policy.tcp == "keep" and addresses == manifest.network.get("addresses")
        log.info(
            "%s: checkpoint %s ready (%s, verify %.2fs, apply %.2fs)",
            view.id,
            entry.id,
            "lazy" if lazily else "full",
            t1 - t0,
            time.monotonic() - t1,
        )
    except BaseException as exc:
        net.cancel()
        abandon(engine, claim, exc)
        if isinstance(exc, Exception):
            raise RestoreFailed(str(exc) or type(exc).__name__) from exc
        raise
    taken = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(manifest.created_at))
    who = policy.identity
    note = f"hotrestart: restoring from checkpoint {claimed.id} taken on {manifest.node} at {taken}"
    if shared:
        who = manifest.identity
        note = f"hotrestart: restoring from the warm snapshot {claimed.id} of {who.pod}, taken at {taken}"
    note += f" (identity {who.canonical()}: {who.source})" if who.source else ""
    note += ", memory on demand" if lazily else ""
    return claim, RestoreImages(os.path.join(claim.work, "images"), criu_work, keep_tcp, note, lazy=lazily)


async def _start_lazy(engine: Engine, view: View, claim: Claim, criu_work: str) -> bool:
    """Unpack `claim` for a lazy restore and start its page daemon; False (everything
    unpacked for a full restore instead) where the daemon cannot run."""
    images = os.path.join(claim.work, "images")
    pages, pagemaps = lazy.lazy_paths(claim.entry)
    await asyncio.to_thread(_decompress_all, engine, claim.entry, claim.work, skip=pages)

    def full(path: str) -> None:
        _decompress_all(engine, claim.entry, claim.work, only={path})

    unpacked = await asyncio.to_thread(lazy.unpack, engine.store, claim.entry, images, pages, pagemaps, full)
    if not unpacked.tasks:
        return False  # no task memory to serve: every page image was written whole
    assert engine.source is not None  # lazy_restores() needs it
    daemon = lazy.Daemon(unpacked, engine.source)
    try:
        os.makedirs(criu_work, mode=0o700, exist_ok=True)
        await daemon.start(engine.runner, view.runc.criu, images, criu_work)
    except (lazy.LazyFailed, OSError) as exc:
        daemon.close()
        log.warning("%s: restoring in full: %s", view.id, exc)
        for path in pages:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lazy.local_path(images, path))
        await asyncio.to_thread(_decompress_all, engine, claim.entry, claim.work, only=pages)
        return False
    claim.daemon = daemon
    return True


async def finish(engine: Engine, view: View, claim: Claim) -> None:
    """After `runc restore`: give GPU processes their device state back, then free the work
    area. On failure the caller abandons the claim (which frees it too)."""
    if claim.manifest.gpu.get("processes") and engine.gpu is not None:
        with telemetry.span("hotrestart.restore.gpu", checkpoint=claim.entry.id):
            device_map, why = await _gpu_placement(engine, claim.manifest)
            if why:
                raise RestoreFailed(why)
            await engine.gpu.after_restore(await view.runc.ps(view.id), device_map)
    record = restores.Record(engine.node, claim.started_at, lazy=claim.daemon is not None)
    if not claim.shared:  # a template's snapshot serves many: its restores are not one story
        engine.calls.later("restore not noted", engine.store.note_restore, claim.entry, record)
    if claim.daemon is not None:
        claim.daemon.hold_uffds()
        claim.resident = asyncio.ensure_future(_until_resident(engine, view, claim, claim.daemon))
        log.info("%s restored from %s; its memory follows on demand", view.id, claim.entry.id)
        return
    claim.drop_work()
    log.info("%s restored from %s", view.id, claim.entry.id)


async def _until_resident(engine: Engine, view: View, claim: Claim, daemon: lazy.Daemon) -> None:
    """Follow a lazy restore until every page has arrived. If any cannot, the process must
    not run on without it: it is killed while its faulting threads still wait, before the
    daemon lets them go, and the checkpoint is quarantined."""
    try:
        took = await daemon.resident()
        log.info(
            "%s: fully resident %.2fs after the restore began (%d MiB on demand)",
            view.id,
            took,
            daemon.unpacked.lazy_bytes >> 20,
        )
        if not claim.shared:
            record = restores.Record(engine.node, claim.started_at, lazy=True, resident_after=took)
            engine.calls.later("restore not noted", engine.store.note_restore, claim.entry, record)
    except lazy.LazyFailed as exc:
        log.error("%s: lazy restore from %s failed, killing the container: %s", view.id, claim.entry.id, exc)
        with contextlib.suppress(Exception):
            await view.runc.kill(view.id, signal.SIGKILL, all_processes=True)
        await _gone(view.pid)
        claim.settled = True
        if not claim.shared or isinstance(exc.__cause__, StoreError):
            with contextlib.suppress(OSError):
                await engine.calls.call(
                    engine.store.quarantine, claim.entry, f"lazy restore failed: {exc}", claim.log_file
                )
    finally:
        claim.drop_work()


async def _gone(pid: int, timeout: float = 5.0) -> None:
    """Wait (a bounded while) for the killed process to be gone."""
    deadline = time.monotonic() + timeout
    while pid and time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        await asyncio.sleep(0.02)


def abandon(engine: Engine, claim: Claim, exc: BaseException) -> str:
    """A restore that failed quarantines its checkpoint with the reason and CRIU's log; one
    cancelled (a ttrpc deadline, containerd gone) is not the checkpoint's fault, so it goes
    back for the next attempt instead of lingering claimed. Returns the reason."""
    reason = str(exc) or type(exc).__name__
    if claim.shared:
        # Other replicas restore from it too: only proof that it is bad sets it aside.
        if isinstance(exc, StoreError) or isinstance(exc.__cause__, StoreError):
            _quarantine_later(engine, claim, reason)
        claim.drop_work()
        return reason
    if (
        isinstance(exc, OSError)
        and not isinstance(exc, StoreError)
        and claim.manifest.restore_attempts + 1 < MAX_SHORT_RESTORES
    ):
        # The store (or this node's disk) failed, not the checkpoint: it goes back, with the
        # attempt counted, for the next create to try again (a few times).
        claim.manifest.restore_attempts += 1
        engine.calls.later("not released", engine.store.release, claim.entry, claim.manifest)
        log.warning("restore from %s failed (%s); checkpoint released", claim.entry.id, reason)
    elif isinstance(exc, Exception):
        _quarantine_later(engine, claim, reason)
    else:
        engine.calls.later("not released", engine.store.release, claim.entry, claim.manifest)
        log.info("restore from %s cancelled; checkpoint released", claim.entry.id)
    claim.drop_work()
    return reason


def _quarantine_later(engine: Engine, claim: Claim, reason: str) -> None:
    """Quarantine `claim`'s checkpoint with its restore log, also when the call runs after
    the work folder holding the log is gone (a remote store's calls run later)."""
    entry, log_file = claim.entry, claim.log_file
    if not engine.calls.remote or not log_file or not os.path.exists(log_file):
        engine.calls.later("not quarantined", engine.store.quarantine, entry, reason, log_file)
        return
    os.makedirs(engine.work.disk, mode=0o700, exist_ok=True)
    fd, kept = tempfile.mkstemp(prefix="restore-log-", dir=engine.work.disk)
    with os.fdopen(fd, "wb") as out, contextlib.suppress(OSError), open(log_file, "rb") as f:
        out.write(f.read(16 << 20))

    def quarantine() -> None:
        try:
            engine.store.quarantine(entry, reason, kept)
        finally:
            os.unlink(kept)

    engine.calls.later("not quarantined", quarantine)


def settle(engine: Engine, claim: Claim, *, died_early: bool) -> None:
    """A restored container ended or proved itself: consume, retry or quarantine its checkpoint."""
    store = engine.store
    if claim.shared or claim.settled:
        return  # a template's snapshot serves the next replica as it is
    if claim.resident is not None and not claim.resident.done():
        # Its chunks still feed the process: the checkpoint stays until every page is in.
        claim.resident.add_done_callback(lambda _: settle(engine, claim, died_early=died_early))
        return
    if died_early:
        claim.manifest.restore_attempts += 1
        if claim.manifest.restore_attempts >= MAX_SHORT_RESTORES:
            reason = f"restored container died within {RESTORE_WINDOW:.0f}s {claim.manifest.restore_attempts} times"
            engine.calls.later("not quarantined", store.quarantine, claim.entry, reason)
            log.warning("checkpoint %s quarantined: %s", claim.entry.id, reason)
            return
        engine.calls.later("not released", store.release, claim.entry, claim.manifest)
        return
    engine.calls.later("not removed", store.remove, claim.entry)


def _claimable(entry: Entry, policy: Policy) -> bool:
    """In a pool, a stopped replica's checkpoint is for any new replica; one taken while its
    pod ran on (periodic, API) only for that pod's own restart: another replica restoring it
    would run a clone of a replica that still runs."""
    manifest = entry.manifest
    return manifest is not None and (manifest.reason == "stop" or manifest.identity.pod == policy.identity.pod)


def _pool_pick(candidates: list[Entry], policy: Policy) -> Entry | None:
    """This pod's own checkpoint first (a restart in place), else the newest claimable one."""
    usable = [e for e in candidates if _claimable(e, policy)]
    own = [e for e in usable if e.manifest is not None and e.manifest.identity.pod == policy.identity.pod]
    chosen = own or usable
    return chosen[0] if chosen else None


async def _claim_another(engine: Engine, view: View, policy: Policy, taken: str) -> Entry | None:
    """Another replica claimed the pool's newest member first: the next newest that fits."""
    for other in await engine.calls.call(engine.store.candidates, policy.identity):
        manifest = other.manifest
        if other.id == taken or manifest is None or not _claimable(other, policy):
            continue
        if await unfit(engine, view, manifest):
            continue
        claimed = await engine.calls.call(engine.store.claim, other)
        if claimed is not None and claimed.manifest is not None:
            return claimed
    return None


async def _gpu_placement(engine: Engine, manifest: Manifest) -> tuple[dict[str, str], str]:
    """(device map, "") when this node can take the checkpoint's GPU state, else ({}, why)."""
    gpu = engine.gpu
    if gpu is None or not gpu.owner():
        return {}, "it holds GPU state and this node has no cuda-checkpoint"
    if manifest.gpu.get("owner") != gpu.owner():
        return {}, f"its GPU state was saved by {manifest.gpu.get('owner')}, this node uses {gpu.owner()}"
    return gpu_plan.placement(manifest.gpu, await gpu.inventory())


def _decompress_all(
    engine: Engine, claimed: Entry, work: str, *, skip: set[str] | None = None, only: set[str] | None = None
) -> None:
    assert claimed.manifest is not None
    chosen = [e for e in claimed.manifest.files if not (skip and e.path in skip) and (only is None or e.path in only)]

    def one(entry: FileEntry) -> None:
        dst = os.path.join(work, entry.path.removesuffix(".zst"))
        os.makedirs(os.path.dirname(dst), mode=0o700, exist_ok=True)
        # Never more than the work area holds: a checkpoint's sizes are its writer's word.
        st = os.statvfs(work)
        engine.store.restore_file(claimed, entry.path, dst, cap=st.f_bavail * st.f_frsize)

    if not engine.store.remote or len(chosen) < 2:
        for entry in chosen:
            one(entry)
        return
    # Across the network most of CRIU's images (a few KiB each) cost a round trip, not
    # bandwidth: fetched at once.
    with concurrent.futures.ThreadPoolExecutor(min(engine.store.io_threads, len(chosen))) as pool:
        for future in [pool.submit(one, e) for e in chosen]:
            future.result()
