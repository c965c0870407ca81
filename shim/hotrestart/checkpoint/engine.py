"""The hot-restart engine: checkpoint a container as it is stopped, restore it when created.

Stop: CRIU dumps the process tree (through `runc checkpoint`) into a private tmpfs when the
node has the memory, the root filesystem changes and carried volumes are captured while
the container's files still exist, and only then is the exit reported. Compression,
hashing and the atomic publish continue in the background; the shim stays up until they
are done. A dump that fails or runs out of its budget publishes nothing, and the caller
delivers the original signal.

Create/Start: the newest compatible checkpoint of the container's identity is claimed (a
rename: exactly one restore wins), verified while it is decompressed, replayed onto the new
root filesystem and volumes, and restored with `runc restore` into the NEW bundle. Every
failure quarantines the checkpoint with the reason and CRIU's log and returns False, and
the caller starts the container cold.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import platform
import shutil
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any

from hotrestart import telemetry
from hotrestart.checkpoint import rootfs, workarea
from hotrestart.checkpoint.compat import image_of, incompatibility, spec_digest
from hotrestart.checkpoint.policy import Policy
from hotrestart.errors import CheckpointError, FilesError
from hotrestart.gpu import plan as gpu_plan
from hotrestart.gpu.state import GpuState
from hotrestart.runtime import netinfo
from hotrestart.runtime.command import CommandRunner
from hotrestart.runtime.runc import CheckpointOpts, Runc
from hotrestart.store import archive
from hotrestart.store.manifest import FileEntry, Identity, Manifest
from hotrestart.store.seal import Sealer
from hotrestart.store.store import Entry, Store

log = logging.getLogger(__name__)

WORK_ROOT = workarea.ROOT
Around = Callable[[], AbstractAsyncContextManager[None]]
RESTORE_WINDOW = 30.0  # a restored container that dies sooner counts as a failed restore
MAX_SHORT_RESTORES = 3
PENDING_WAIT = 30.0
RAW = "raw"  # a staging folder's uncompressed captures, removed before publishing


@dataclasses.dataclass
class Subject:
    """What the engine needs to know of a container (plain values, no container object)."""

    id: str
    bundle: str
    spec: Mapping[str, Any]
    runc: Runc
    upperdir: str
    terminal: bool
    pid: int


@dataclasses.dataclass
class Dumped:
    """A dumped container waiting to be compressed and published."""

    id: str
    staging: str
    work: str
    tmpfs: bool
    files: list[tuple[str, str]]  # (raw file, path in the checkpoint)
    manifest: Manifest
    started: float
    images: str  # the raw CRIU images, until published
    early: archive.Follower | None = None  # compressing the page images since the dump began
    seals: _Seals | None = None  # with a store key


class _Seals:
    """Seals the chunks of one checkpoint being written. A file's position in the manifest
    is part of each of its chunks' nonces, so positions are handed out as files are first
    seen (the page images while CRIU still writes them) and the manifest lists files in
    that order."""

    def __init__(self, sealer: Sealer) -> None:
        self.sealer = sealer
        self._index: dict[str, int] = {}
        self._lock = threading.Lock()

    def file(self, rel: str) -> archive.ChunkSeal:
        with self._lock:
            index = self._index.setdefault(rel, len(self._index))
        return functools.partial(self.sealer.seal_chunk, index)

    def ordered(self, entries: list[FileEntry]) -> list[FileEntry]:
        ordered = sorted(entries, key=lambda e: self._index.get(e.path, -1))
        if [self._index.get(e.path) for e in ordered] != list(range(len(ordered))):
            raise CheckpointError("sealed files do not match the checkpoint's file list")
        return ordered


@dataclasses.dataclass(frozen=True)
class DumpRequest:
    """Why and how to dump: a stop ends the container; API and periodic checkpoints leave it
    running. TCP connections and file locks are dumped by default so that any checkpoint can
    serve as a restore point (the restore closes connections unless the address is kept)."""

    reason: str  # stop, api, periodic
    leave_running: bool
    tcp_established: bool = True
    file_locks: bool = True
    ext_unix_sk: bool = False
    empty_ns: tuple[str, ...] = ()
    cgroups_mode: str = ""


@dataclasses.dataclass
class Claim:
    entry: Entry
    manifest: Manifest
    restored_at: float = 0.0


class RestoreFailed(Exception):
    """A restore could not complete; the message is the reason shown to the user."""

    def __init__(self, reason: str, log_file: str = "") -> None:
        super().__init__(reason)
        self.log_file = log_file


def _memory_usage(pid: int) -> int:
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


def _volume_sources(spec: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, str]:
    """emptyDir volume name -> host directory, for the named volumes mounted in `spec`."""
    found: dict[str, str] = {}
    for m in spec.get("mounts") or []:
        source = str(m.get("source") or "")
        marker = "/volumes/kubernetes.io~empty-dir/"
        if marker in source:
            name = source.split(marker, 1)[1].split("/", 1)[0]
            if name in names and os.path.isdir(source):
                found[name] = source
    return found


MEMORY_SLACK = 64 << 20  # CRIU's images carry some metadata beyond the pages themselves


def _beyond_memory_limit(manifest: Manifest, spec: Mapping[str, Any]) -> str:
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


def _room_for(staging: str, memory: int) -> None:
    """Refuse a dump the store cannot keep: once CRIU has dumped a stopping container its
    processes are gone, and a publish that then fails would lose them unsignalled. Memory
    is the images' size before compression, so this errs on the safe side."""
    st = os.statvfs(staging)
    free = st.f_bavail * st.f_frsize
    if free < memory:
        raise CheckpointError(f"the store has {free >> 20} MiB free and the checkpoint may need {memory >> 20} MiB")


def _replay(replays: list[tuple[str, str, str]]) -> None:
    for target, tar, changes in replays:
        rootfs.apply(target, tar, rootfs.load_changes(changes) if changes else None)


def _private(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_CLOEXEC | os.O_EXCL, 0o600)


class Engine:
    def __init__(
        self,
        runner: CommandRunner,
        store: Store,
        *,
        work_root: str = WORK_ROOT,
        node: str = "",
        gpu: GpuState | None = None,
    ) -> None:
        self._runner = runner
        self.gpu = gpu
        self.store = store
        self.work_root = work_root
        self.node = node or socket.gethostname()
        self._runtime: dict[str, str] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._newest: dict[str, float] = {}  # identity -> wall time of its newest successful dump here
        self._in_flight: dict[str, tuple[str, str]] = {}  # checkpoint id -> (identity, reason), while published
        self._publish_lock = asyncio.Lock()
        # Work folders of shims that were killed hold process memory, often on tmpfs.
        workarea.sweep(work_root)

    # -- shared ---------------------------------------------------------------------------------

    async def runtime_info(self, runc: Runc) -> dict[str, str]:
        if self._runtime is None:
            criu = ""
            with contextlib.suppress(OSError):
                result = await self._runner.run([shutil.which("criu") or "criu", "--version"])
                for line in result.stdout.decode(errors="replace").splitlines():
                    if line.startswith("Version:"):
                        criu = line.split(":", 1)[1].strip()
            runc_version = ""
            with contextlib.suppress(OSError):
                runc_version = await runc.version()
            self._runtime = {
                "runc": runc_version,
                "criu": criu,
                "kernel": platform.release(),
                "arch": platform.machine(),
            }
        return self._runtime

    def _work_dir(self, name: str, size: int, prefault: bool = False) -> tuple[str, bool]:
        return workarea.make(self.work_root, name, size, prefault=prefault)

    def _drop_work(self, path: str, tmpfs: bool) -> None:
        workarea.drop(path, tmpfs)

    def _track(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def drain(self, timeout: float = 600.0) -> None:
        """Wait for background publishes (the shim must not exit under them)."""
        if self._background:
            await asyncio.wait(list(self._background), timeout=timeout)

    # -- checkpoint -----------------------------------------------------------------------------

    async def checkpoint_on_stop(
        self,
        subject: Subject,
        policy: Policy,
        budget: float,
        *,
        around: Around | None = None,
        gpu: dict[str, Any] | None = None,
    ) -> bool:
        """Dump and capture `subject`; True when its processes are gone and the rest is queued."""
        try:
            req = DumpRequest("stop", leave_running=False)
            dumped = await self.dump(subject, policy, req, budget, around=around, gpu=gpu)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("%s: checkpoint on stop failed: %s", subject.id, exc)
            return False
        self.publish_later(dumped)
        return True

    async def dump(
        self,
        subject: Subject,
        policy: Policy,
        req: DumpRequest,
        budget: float | None,
        *,
        around: Around | None = None,
        gpu: dict[str, Any] | None = None,
    ) -> Dumped:
        """CRIU-dump `subject` into a private work folder (tmpfs when memory allows) and
        capture its files, within `budget` seconds. The process tree is frozen only for the
        dump itself (`around` wraps exactly the `runc checkpoint` call: the caller's freeze);
        nothing is published yet. Raises on failure, leaving nothing behind."""
        t0 = time.monotonic()
        runtime = await self.runtime_info(subject.runc)
        if not runtime.get("criu"):
            raise CheckpointError("no CRIU on this node")
        cid, staging = self.store.new_staging()
        sealer = self.store.sealer(cid)
        seals = _Seals(sealer) if sealer is not None else None
        self.store.mark_pending(policy.identity, cid)
        usage = _memory_usage(subject.pid)
        work, tmpfs = self._work_dir(cid, usage, prefault=req.leave_running)
        net = asyncio.ensure_future(asyncio.to_thread(netinfo.addresses, netinfo.netns_path(subject.spec)))
        timings: dict[str, float] = {}
        early: archive.Follower | None = None
        try:
            images = os.path.join(work, "images")
            if not req.leave_running:
                # The application is going away anyway, so its memory is compressed while
                # CRIU still writes it; a dump that leaves it running keeps every core for
                # CRIU instead, to keep the freeze short.
                os.makedirs(os.path.join(staging, "images"), mode=0o700, exist_ok=True)
                early = archive.Follower(
                    images, os.path.join(staging, "images"), "images/", seal_for=seals.file if seals else None
                )
                early.start()
            opts = CheckpointOpts(
                image_path=images,
                work_path=os.path.join(work, "criu"),
                leave_running=req.leave_running,
                tcp_established=req.tcp_established,
                ext_unix_sk=req.ext_unix_sk,
                shell_job=subject.terminal,
                file_locks=req.file_locks,
                empty_ns=req.empty_ns,
                manage_cgroups_mode=req.cgroups_mode,
            )
            log.info("%s: dump %s (%s) begins", subject.id, cid, req.reason)
            with telemetry.span("hotrestart.checkpoint.dump", container=subject.id, reason=req.reason) as sp:
                outcome = "failed"
                try:
                    async with around() if around is not None else contextlib.nullcontext():
                        # Files first, while the processes are frozen (consistent with their
                        # memory) and before the dump ends them: a capture that fails leaves
                        # the container running, to be signalled, instead of gone unsaved.
                        t1 = time.monotonic()
                        with telemetry.span("hotrestart.checkpoint.rootfs_diff", container=subject.id) as fsp:
                            captured = await asyncio.to_thread(self._capture_files, subject, policy, staging)
                            fsp.set("files", len(captured))
                        timings["rootfs_diff"] = time.monotonic() - t1
                        _room_for(staging, usage)
                        left = None if budget is None else max(t0 + budget - time.monotonic(), 0.1)
                        await subject.runc.checkpoint(subject.id, opts, timeout=left)
                    outcome = "ok"
                except TimeoutError:
                    outcome = "timeout"
                    raise CheckpointError(f"the dump did not finish within {budget or 0:.1f}s") from None
                finally:
                    sp.set("outcome", outcome)
                    timings["dump"] = time.monotonic() - t0
                    took = timings["dump"]
                    log.info("%s: dump %s (%s) ends: %s after %.2fs", subject.id, cid, req.reason, outcome, took)
            self._newest[policy.identity.canonical()] = time.time()
            files = [(os.path.join(images, name), f"images/{name}.zst") for name in sorted(os.listdir(images))]
            files += captured
        except BaseException:
            net.cancel()
            if early is not None:
                early.close()
            self._keep_dump_log(subject, work)
            self._drop_work(work, tmpfs)
            self.store.discard(staging)
            self.store.clear_pending(policy.identity, cid)
            raise
        try:
            addresses = await asyncio.wait_for(net, 5)
        except Exception as exc:
            log.info("%s: could not read pod addresses: %s", subject.id, exc)
            addresses = []
        manifest = Manifest(
            id=cid,
            identity=policy.identity,
            created_at=time.time(),
            node=self.node,
            reason=req.reason,
            image=image_of(subject.spec),
            spec_digest=spec_digest(subject.spec),
            runtime=runtime,
            network={"addresses": addresses},
            files=[],
            timings=timings,
            tcp=policy.tcp,
            gpu=gpu or {},
        )
        return Dumped(cid, staging, work, tmpfs, files, manifest, t0, os.path.join(work, "images"), early, seals)

    def discard(self, dumped: Dumped) -> None:
        if dumped.early is not None:
            dumped.early.close()
        self._drop_work(dumped.work, dumped.tmpfs)
        self.store.discard(dumped.staging)
        self.store.clear_pending(dumped.manifest.identity, dumped.id)

    def publish_later(self, dumped: Dumped) -> asyncio.Task[None]:
        """Compress, hash and publish `dumped` in the background (the shim waits for it on exit)."""
        return self._track(self._publish(dumped))

    def publishing(self, identity: Identity, reason: str) -> bool:
        """A checkpoint of `identity` taken here for `reason` is still being compressed or published."""
        return (identity.canonical(), reason) in self._in_flight.values()

    def retire(self, identity: Identity, reasons: tuple[str, ...]) -> None:
        """Drop the restore points of `identity` taken for `reasons` (a clean exit ends them)."""
        self._newest[identity.canonical()] = time.time()
        for entry in self.store.published(identity):
            if entry.manifest is not None and entry.manifest.reason in reasons:
                self.store.remove(entry)

    def _capture_files(self, subject: Subject, policy: Policy, staging: str) -> list[tuple[str, str]]:
        """Capture the container's files into the store's own disk (never a memory-sized
        tmpfs: a small process may carry a large root filesystem)."""
        raw = os.path.join(staging, RAW)
        os.mkdir(raw, 0o700)
        files: list[tuple[str, str]] = []
        if subject.upperdir and os.path.isdir(subject.upperdir):
            tar = os.path.join(raw, "rootfs-diff.tar")
            with open(tar, "wb", opener=_private) as f:
                changes = rootfs.capture(subject.upperdir, f, overlay=True)
            changes_path = os.path.join(raw, "rootfs-diff.json")
            with open(changes_path, "w", opener=_private) as f:
                f.write(changes.to_json())
            files += [(tar, "rootfs-diff.tar.zst"), (changes_path, "rootfs-diff.json.zst")]
            if changes.skipped:
                log.info("%s: files not carried: %s", subject.id, "; ".join(changes.skipped[:20]))
        for name, source in sorted(_volume_sources(subject.spec, policy.carry_volumes).items()):
            tar = os.path.join(raw, f"volume-{name}.tar")
            with open(tar, "wb", opener=_private) as f:
                skipped = rootfs.capture(source, f, overlay=False).skipped
            files.append((tar, f"volumes/{name}.tar.zst"))
            if skipped:
                log.info("%s: files of volume %s not carried: %s", subject.id, name, "; ".join(skipped[:20]))
        return files

    def _keep_dump_log(self, subject: Subject, work: str) -> None:
        """Keep CRIU's log of a failed dump as <bundle>/criu-dump.log, where runc-v2 puts it."""
        with contextlib.suppress(OSError):
            shutil.copyfile(os.path.join(work, "criu", "dump.log"), os.path.join(subject.bundle, "criu-dump.log"))

    async def _publish(self, dumped: Dumped) -> None:
        manifest = dumped.manifest
        identity = manifest.identity.canonical()
        self._in_flight[dumped.id] = (identity, manifest.reason)
        try:
            t0 = time.monotonic()
            with telemetry.span("hotrestart.checkpoint.compress", checkpoint=dumped.id) as sp:
                entries = await asyncio.to_thread(self._compress_all, dumped)
                manifest.files = entries
                sp.set("raw_bytes", manifest.raw_bytes)
                sp.set("stored_bytes", manifest.stored_bytes)
            manifest.timings["compress"] = time.monotonic() - t0
            t1 = time.monotonic()
            async with self._publish_lock:
                if self._newest.get(identity, 0.0) > manifest.created_at:
                    # A later checkpoint (or a clean exit) of the same container came first.
                    log.info("checkpoint %s of %s superseded; dropped", dumped.id, identity)
                    self.store.discard(dumped.staging)
                    return
                with telemetry.span("hotrestart.checkpoint.publish", checkpoint=dumped.id):
                    manifest.timings["durable"] = time.monotonic() - dumped.started
                    sealer = dumped.seals.sealer if dumped.seals is not None else None
                    published = await asyncio.to_thread(self.store.publish, dumped.staging, manifest, sealer)
            if published is None:
                log.info("checkpoint %s of %s is older than the published one; dropped", dumped.id, identity)
                return
            manifest.timings["publish"] = time.monotonic() - t1
            log.info(
                "checkpoint %s of %s published: %d bytes (%d raw) in %.2fs",
                dumped.id,
                manifest.identity.canonical(),
                manifest.stored_bytes,
                manifest.raw_bytes,
                time.monotonic() - dumped.started,
            )
        except Exception as exc:
            log.error("checkpoint %s could not be published: %s", dumped.id, exc)
            self.store.discard(dumped.staging)
        finally:
            self._in_flight.pop(dumped.id, None)
            if dumped.early is not None:
                dumped.early.close()
            self._drop_work(dumped.work, dumped.tmpfs)
            self.store.clear_pending(manifest.identity, dumped.id)

    def _compress_all(self, dumped: Dumped) -> list[FileEntry]:
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

    # -- create / start -------------------------------------------------------------------------

    async def find(self, spec: Mapping[str, Any], policy: Policy, runc: Runc) -> tuple[Entry | None, str]:
        """The checkpoint to restore `spec` from, or (None, why not)."""
        waited = 0.0
        # A checkpoint being written (the stop of the previous incarnation) is waited for.
        while self.store.is_pending(policy.identity) and waited < PENDING_WAIT:
            await asyncio.sleep(0.1)
            waited += 0.1
        # A small directory listing: done inline, since a worker thread would stay in every shim.
        entry = self.store.latest(policy.identity)
        if entry is None or entry.manifest is None:
            return None, "no checkpoint"
        reason = incompatibility(entry.manifest, spec, await self.runtime_info(runc)) or _beyond_memory_limit(
            entry.manifest, spec
        )
        if not reason and entry.manifest.gpu.get("processes"):
            _, reason = await self._gpu_placement(entry.manifest)
        if reason:
            return None, f"checkpoint {entry.id} not compatible: {reason}"
        return entry, ""

    async def _gpu_placement(self, manifest: Manifest) -> tuple[dict[str, str], str]:
        """(device map, "") when this node can take the checkpoint's GPU state, else ({}, why)."""
        if self.gpu is None or not self.gpu.owner():
            return {}, "it holds GPU state and this node has no cuda-checkpoint"
        if manifest.gpu.get("owner") != self.gpu.owner():
            return {}, f"its GPU state was saved by {manifest.gpu.get('owner')}, this node uses {self.gpu.owner()}"
        return gpu_plan.placement(manifest.gpu, await self.gpu.inventory())

    async def restore(
        self, subject: Subject, entry: Entry, policy: Policy, launch: Callable[[str, str, bool], Awaitable[None]]
    ) -> Claim:
        """Restore `subject` from `entry`; `launch(image_path, keep_tcp)` runs runc restore."""
        claimed = self.store.claim(entry)
        if claimed is None or claimed.manifest is None:
            raise RestoreFailed(f"checkpoint {entry.id} was claimed by another restore")
        manifest = claimed.manifest
        work, tmpfs = "", False
        restore_log = ""
        net = asyncio.ensure_future(asyncio.to_thread(netinfo.addresses, netinfo.netns_path(subject.spec)))
        try:
            work, tmpfs = self._work_dir(f"restore-{entry.id}", manifest.raw_bytes)
            criu_work = os.path.join(work, "criu")
            restore_log = os.path.join(criu_work, "restore.log")
            t0 = time.monotonic()
            with telemetry.span("hotrestart.restore.verify", checkpoint=entry.id) as sp:
                await asyncio.to_thread(self._decompress_all, claimed, work)
                sp.set("stored_bytes", manifest.stored_bytes)
            t1 = time.monotonic()
            with telemetry.span("hotrestart.restore.rootfs_apply", checkpoint=entry.id):
                await self._apply_files(subject, policy, manifest, work)
            t2 = time.monotonic()
            try:
                addresses = await asyncio.wait_for(net, 5)
            except Exception:
                addresses = []
            keep_tcp = policy.tcp == "keep" and addresses == manifest.network.get("addresses")
            with telemetry.span("hotrestart.restore.restore", checkpoint=entry.id, keep_tcp=keep_tcp):
                await launch(os.path.join(work, "images"), criu_work, keep_tcp)
            if manifest.gpu.get("processes") and self.gpu is not None:
                with telemetry.span("hotrestart.restore.gpu", checkpoint=entry.id):
                    device_map, why = await self._gpu_placement(manifest)
                    if why:
                        raise RestoreFailed(why)
                    await self.gpu.after_restore(await subject.runc.ps(subject.id), device_map)
            log.info(
                "%s restored from %s (verify %.2fs, apply %.2fs, restore %.2fs)",
                subject.id,
                entry.id,
                t1 - t0,
                t2 - t1,
                time.monotonic() - t2,
            )
            return Claim(claimed, manifest, time.monotonic())
        except Exception as exc:
            net.cancel()
            reason = str(exc) or type(exc).__name__
            with contextlib.suppress(OSError):
                self.store.quarantine(claimed, reason, restore_log)
            raise RestoreFailed(reason, restore_log) from exc
        except BaseException:
            # Cancelled (a ttrpc deadline, containerd gone): not the checkpoint's fault, so it
            # goes back for the next attempt instead of lingering claimed.
            net.cancel()
            with contextlib.suppress(OSError):
                self.store.release(claimed, manifest)
            log.info("%s: restore from %s cancelled; checkpoint released", subject.id, entry.id)
            raise
        finally:
            if work:
                self._drop_work(work, tmpfs)

    def _decompress_all(self, claimed: Entry, work: str) -> None:
        assert claimed.manifest is not None
        for entry in claimed.manifest.files:
            dst = os.path.join(work, entry.path.removesuffix(".zst"))
            os.makedirs(os.path.dirname(dst), mode=0o700, exist_ok=True)
            # Never more than the work area holds: a checkpoint's sizes are its writer's word.
            st = os.statvfs(work)
            self.store.restore_file(claimed, entry.path, dst, cap=st.f_bavail * st.f_frsize)

    async def _apply_files(self, subject: Subject, policy: Policy, manifest: Manifest, work: str) -> None:
        names = {f.path for f in manifest.files}
        replays: list[tuple[str, str, str]] = []
        if "rootfs-diff.tar.zst" in names:
            changes = os.path.join(work, "rootfs-diff.json") if "rootfs-diff.json.zst" in names else ""
            replays.append((os.path.join(subject.bundle, "rootfs"), os.path.join(work, "rootfs-diff.tar"), changes))
        carried = tuple(p.removeprefix("volumes/").removesuffix(".tar.zst") for p in names if p.startswith("volumes/"))
        targets = _volume_sources(subject.spec, carried)
        for name in sorted(carried):
            if name not in targets:
                raise RestoreFailed(f"volume {name} travelled with the checkpoint but the new pod does not mount it")
            replays.append((targets[name], os.path.join(work, "volumes", f"{name}.tar"), ""))
        try:
            await asyncio.to_thread(_replay, replays)
        except FilesError as exc:
            raise RestoreFailed(str(exc)) from exc

    # -- after a restore --------------------------------------------------------------------------

    def settle(self, claim: Claim, *, died_early: bool) -> None:
        """A restored container ended or proved itself: consume, retry or quarantine its checkpoint."""
        if died_early:
            claim.manifest.restore_attempts += 1
            if claim.manifest.restore_attempts >= MAX_SHORT_RESTORES:
                reason = f"restored container died within {RESTORE_WINDOW:.0f}s {claim.manifest.restore_attempts} times"
                with contextlib.suppress(OSError):
                    self.store.quarantine(claim.entry, reason)
                log.warning("checkpoint %s quarantined: %s", claim.entry.id, reason)
                return
            with contextlib.suppress(OSError):
                self.store.release(claim.entry, claim.manifest)
            return
        with contextlib.suppress(OSError):
            self.store.remove(claim.entry)
