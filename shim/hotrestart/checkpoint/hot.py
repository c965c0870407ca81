"""Hot restart of one container: the `Checkpointing` its container asks.

Stop: a stop signal becomes a CRIU dump within the policy's budget; when it succeeds the
processes are gone and the checkpoint is published in the background, when it fails the
container delivers the signal. Create: the newest compatible checkpoint is planned,
prepared at Start and restored by the container's own `runc restore`; a restored container
that dies within `RESTORE_WINDOW` gives its checkpoint back (quarantined after
`MAX_SHORT_RESTORES`), one that outlives it uses it up. API checkpoints and periodic ones
become the identity's newest restore point.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import shutil
from collections.abc import Awaitable, Callable, Mapping

from hotrestart.checkpoint import dump, identity, restore, template
from hotrestart.checkpoint.attested import ArchivePolicy
from hotrestart.checkpoint.clock import Clock, LoopClock, Timer
from hotrestart.checkpoint.dumped import DumpRequest
from hotrestart.checkpoint.engine import Engine
from hotrestart.checkpoint.plain import PlainCheckpoints
from hotrestart.checkpoint.policy import Policy, policy_for
from hotrestart.checkpoint.tracking import Tracking
from hotrestart.container.seam import CheckpointConfig, Checkpointing, RestoreImages, RestorePlan, View
from hotrestart.errors import FailedPreconditionError, InvalidArgumentError
from hotrestart.gpu.state import GpuState
from hotrestart.runtime import cgroups, mounts
from hotrestart.store.entry import Entry
from hotrestart.store.manifest import Identity

log = logging.getLogger(__name__)


SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
# Seconds after start before the pod's labels are asked (see identify): off pod start-up,
# and done before nearly every stop.
IDENTIFY_AFTER = 1.0
# The labels of a pod, by its sandbox id (from containerd, see workload.containerd_api).
PodLabels = Callable[[str], Awaitable[Mapping[str, str]]]


class HotRestart(PlainCheckpoints):
    def __init__(
        self,
        view: View,
        engine: Engine,
        policy: Policy,
        gpu: GpuState | None = None,
        *,
        clock: Clock | None = None,
        pod_labels: PodLabels | None = None,
        archives: ArchivePolicy | None = None,
    ) -> None:
        super().__init__(view, gpu, gpu_lock_timeout=policy.gpu_lock_timeout, archives=archives)
        self.engine = engine
        self.policy = policy
        self._pod_labels = pod_labels
        self._identified = False
        self._identifying = asyncio.Lock()
        self._identify_later: asyncio.Task[None] | None = None
        self.clock: Clock = clock or LoopClock()
        self._planned: Entry | None = None
        self._restoring = ""  # the checkpoint being restored, for messages
        self._claim: restore.Claim | None = None
        self._restored_at = 0.0
        self._finishing = False  # between `runc restore` and the end of `finish_restore`
        self._window: Timer | None = None
        self._stopping = False
        self._periodic: asyncio.Task[None] | None = None
        self._template: asyncio.Task[None] | None = None  # waits for warm, then snapshots
        self._from_template = False  # restored from its template's snapshot
        # Named after the shim, like the work folders, so that one left by a killed shim is swept.
        tag = hashlib.sha256(view.id.encode()).hexdigest()[:16]
        self._tracking = Tracking(os.path.join(engine.work.memory, f"{os.getpid()}-track-{tag}"))

    @property
    def hot(self) -> bool:
        return self.policy.enabled and not self.untrusted

    # -- create / start -------------------------------------------------------------------------

    async def identify(self, *, at_create: bool = False) -> None:
        """Settle which checkpoints this container's are: the annotation's key, else the
        workload the pod's labels name, else the pod name.

        Asking containerd for the labels costs a helper process (see workload.lookup). At
        create it is only worth it when the namespace has workload checkpoints to find;
        otherwise the pod name serves the lookup, and the labels are asked a little after
        start (`started`) or at the first dump, whichever comes first."""
        async with self._identifying:
            if not self._identified:
                await self._identify(at_create)

    async def _identify(self, at_create: bool) -> None:
        chosen = identity.from_annotation(self.policy.identity)
        if chosen is None:
            namespace = self.policy.identity.namespace
            if at_create and not await self.engine.calls.call(self.engine.store.has_workloads, namespace):
                return  # the pod name finds what there is; decided for good at the first dump
            chosen = await self._from_labels()
        self._identified = True
        self.policy = dataclasses.replace(self.policy, identity=chosen)
        log.info("%s: identity %s (%s)", self.view.id, chosen.canonical(), chosen.source)

    async def _from_labels(self) -> Identity:
        base = self.policy.identity
        sandbox = str((self.view.spec.get("annotations") or {}).get(SANDBOX_ID, ""))
        if self._pod_labels is None or not sandbox:
            return identity.by_pod_name(base, "the pod's labels are not available here")
        try:
            labels = await self._pod_labels(sandbox)
        except Exception as exc:
            log.warning("%s: pod labels unavailable, identity by pod name: %s", self.view.id, exc)
            return identity.by_pod_name(base, f"pod labels unavailable: {exc}")
        return identity.from_labels(base, labels)

    async def plan_restore(self) -> RestorePlan:
        await self.identify(at_create=True)
        try:
            entry, why = await restore.find(self.engine, self.view, self.policy)
        except Exception as exc:
            entry, why = None, f"checkpoint lookup failed: {exc}"
        if entry is None:
            if why == "no checkpoint":
                return RestorePlan(False)
            log.warning("%s: starting cold: %s", self.view.id, why)
            who = self.policy.identity
            return RestorePlan(False, f"hotrestart: starting cold: {why} (identity {who.canonical()}: {who.source})")
        self._planned = entry
        log.info("%s: will restore from checkpoint %s", self.view.id, entry.id)
        return RestorePlan(True)

    async def prepare_restore(self) -> RestoreImages:
        entry, self._planned = self._planned, None
        if entry is None:
            raise FailedPreconditionError(f"container {self.view.id}: no restore was planned")
        self._restoring = entry.id
        self._claim, images = await restore.prepare(self.engine, self.view, entry, self.policy)
        self._from_template = self._claim.shared
        return images

    async def finish_restore(self) -> None:
        if self._claim is None:  # restored from containerd's images, not a checkpoint of ours
            await super().finish_restore()
            return
        claim = self._claim
        # An exit can be reported while a GPU process gets its device state back (the awaits
        # of `finish`): that is an early death too, however long the hand-back took.
        self._finishing = True
        try:
            await restore.finish(self.engine, self.view, claim)
        except BaseException:
            if self._claim is None:  # settled by that exit: the work area is still to free
                claim.drop_work()
            raise
        finally:
            self._finishing = False
        self._restored_at = self.clock.monotonic()
        self._window = self.clock.call_later(restore.RESTORE_WINDOW, self._restore_proved)

    def abandon_restore(self, exc: BaseException) -> str:
        claim, self._claim = self._claim, None
        # `prepare` gives its claim up itself when it fails; after it, this does.
        reason = restore.abandon(self.engine, claim, exc) if claim is not None else str(exc) or type(exc).__name__
        if isinstance(exc, Exception):
            log.warning("%s: restore from %s failed, starting cold: %s", self.view.id, self._restoring, reason)
        return f"hotrestart: restore from checkpoint {self._restoring} failed ({reason}); started cold"

    def _restore_proved(self) -> None:
        """The restored container outlived the window: its checkpoint is used up."""
        self._window = None
        if self._claim is not None:
            restore.settle(self.engine, self._claim, died_early=False)
            self._claim = None

    def started(self) -> None:
        if self.untrusted:
            return  # restored from images nothing vouched for: nothing of it goes to the store
        if not self._identified and self._identify_later is None:
            self._identify_later = asyncio.ensure_future(self._identify_after(IDENTIFY_AFTER))
        if self.policy.interval > 0 and self._periodic is None:
            self._periodic = asyncio.ensure_future(self._periodic_checkpoints(self.policy.interval))
        snapshot = self.policy.snapshot
        if snapshot is not None and self._from_template and snapshot.signal:
            # An environment variable is fixed at exec: a signal tells a clone it is one.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.view.pid, snapshot.signal)
        elif snapshot is not None and not self._from_template and self._template is None:
            self._template = asyncio.ensure_future(self._template_when_warm())

    async def _template_when_warm(self) -> None:
        """This replica as its pod template's snapshot once warm, unless a usable one exists
        (or it is no ReplicaSet's pod)."""
        snapshot = self.policy.snapshot
        assert snapshot is not None
        if not await template.warm(self.view.pid, snapshot, self.clock):
            return
        await self.identify()
        snap = identity.template_of(self.policy.identity)
        if snap is None:
            log.warning("%s: hotrestart.io/snapshot applies to a ReplicaSet's pods (pod-template-hash)", self.view.id)
            return
        try:
            existing = await self.engine.calls.call(template.current, self.engine.store, snap, snapshot.ttl)
            if existing is not None and existing.manifest is not None:
                if not await restore.unfit(self.engine, self.view, existing.manifest):
                    log.info("%s: template snapshot %s exists; none taken", self.view.id, existing.id)
                    return
            async with self.dump_lock:
                if self._stopping or not (self.view.running or self.view.paused):
                    return
                async with self.prepared(False) as prep:
                    dumped = await dump.dump(
                        self.engine,
                        self.view,
                        dataclasses.replace(self.policy, identity=snap),
                        DumpRequest(template.REASON, leave_running=True),
                        self.policy.timeout,
                        around=prep.freeze,
                        gpu=prep.gpu,
                        tracking=await self._chain(),
                    )
            self.engine.publisher.publish_later(dumped)
            log.info("%s: template snapshot %s taken for %s", self.view.id, dumped.id, snap.canonical())
        except Exception as exc:
            log.warning("%s: template snapshot failed: %s", self.view.id, exc)

    # -- checkpoints ----------------------------------------------------------------------------

    async def checkpoint_for_stop(self, sig: int) -> bool:
        self._stopping = True
        if self.untrusted:
            return False
        started = self.clock.monotonic()
        await self.identify()
        async with self.dump_lock:  # a periodic or API checkpoint in progress finishes first
            try:
                await self._resident(self.policy.timeout - (self.clock.monotonic() - started))
            except TimeoutError:
                log.warning("%s: memory still arriving from the restore: no checkpoint on stop", self.view.id)
                return False
            left = self.policy.timeout - (self.clock.monotonic() - started)
            if left <= 0.5 or not self.view.running:
                return False
            try:
                async with self.prepared(True) as prep:
                    dumped = await dump.dump(
                        self.engine,
                        self.view,
                        self.policy,
                        DumpRequest("stop", leave_running=False),
                        left,
                        around=prep.freeze,
                        gpu=prep.gpu,
                        tracking=await self._chain(),
                    )
            except Exception as exc:
                log.warning("%s: checkpoint on stop failed: %s", self.view.id, exc)
                cgroups.thaw(self.view.pid)  # the signal must reach a running container
                return False
        self.engine.publisher.publish_later(dumped)
        return True

    async def checkpoint(self, cfg: CheckpointConfig) -> None:
        """An API checkpoint: dump once into fast private storage, hand containerd its copy
        of the images, and keep the dump as the identity's newest restore point. During a
        stop it is a plain `runc checkpoint` (the stop's dump owns the store's turn). For a
        replica with `hotrestart.io/snapshot: template` it is the template's new snapshot."""
        if self._stopping or self.untrusted:
            await super().checkpoint(cfg)
            return
        await self.identify()
        policy, reason = self.policy, "api"
        snap = identity.template_of(policy.identity) if policy.snapshot is not None and not cfg.exit else None
        if snap is not None:
            policy, reason = dataclasses.replace(policy, identity=snap), template.REASON
        req = DumpRequest(reason, leave_running=not cfg.exit)
        if cfg.options_given:
            req = DumpRequest(
                reason,
                leave_running=not cfg.exit,
                tcp_established=cfg.open_tcp,
                file_locks=cfg.file_locks,
                ext_unix_sk=cfg.external_unix_sockets,
                empty_ns=cfg.empty_namespaces,
                cgroups_mode=cfg.cgroups_mode,
            )
        async with self.dump_lock:
            await self._resident(None)
            async with self.prepared(cfg.exit) as prep:
                # Whole: containerd gets these images as they are, with no parent to read.
                dumped = await dump.dump(
                    self.engine,
                    self.view,
                    policy,
                    req,
                    None,
                    around=prep.freeze,
                    gpu=prep.gpu,
                    tracking=await self._chain(),
                    incremental=False,
                )
        try:
            await asyncio.to_thread(_copy_images, dumped.images, cfg.path)
            await self.attest(cfg.path, os.listdir(dumped.images))
            if not cfg.options_given:
                await asyncio.to_thread(_leave_criu_logs_for_cri, self.view, os.path.join(dumped.work, "criu"))
        except BaseException:
            self.engine.publisher.discard(dumped)
            raise
        self.engine.publisher.publish_later(dumped)

    async def _periodic_checkpoints(self, interval: float) -> None:
        """Leave-running checkpoints on a schedule. A failure is logged and retried at the next
        tick; a tick is skipped while the previous checkpoint is still being published."""
        while True:
            await self.clock.sleep(interval)
            if self._stopping:
                return
            await self.identify()
            if self.engine.publisher.publishing(self.policy.identity, "periodic"):
                log.info("%s: previous checkpoint still being published; skipping this interval", self.view.id)
                continue
            try:
                async with self.dump_lock:
                    # A paused container is dumped as it is (containerd pauses around its own checkpoints).
                    if self._stopping or not (self.view.running or self.view.paused):
                        continue
                    await self._resident(interval)
                    req = DumpRequest("periodic", leave_running=True)
                    async with self.prepared(False) as prep:
                        dumped = await dump.dump(
                            self.engine,
                            self.view,
                            self.policy,
                            req,
                            # No stop is waiting on it: only the next tick bounds it. The stop
                            # budget would throw away every dump of a large container.
                            max(self.policy.timeout, interval),
                            around=prep.freeze,
                            gpu=prep.gpu,
                            tracking=await self._chain(),
                        )
                self.engine.publisher.publish_later(dumped)
            except Exception as exc:
                log.warning("%s: periodic checkpoint failed (next in %.0fs): %s", self.view.id, interval, exc)

    async def _chain(self) -> Tracking | None:
        """The container's chain of dumps, where the node tracks the pages written to."""
        if not self.policy.incremental:
            return None
        return self._tracking if await self.engine.memory_tracking(self.view.runc) else None

    async def _resident(self, budget: float | None) -> None:
        """Return once a lazily restored container has all of its memory back (TimeoutError
        past `budget` seconds): CRIU must not dump a process whose pages are still arriving."""
        claim = self._claim
        if claim is None or claim.resident is None or claim.resident.done():
            return
        if budget is not None and budget <= 0:
            raise TimeoutError
        async with asyncio.timeout(budget):
            await asyncio.shield(claim.resident)

    # -- endings --------------------------------------------------------------------------------

    def interrupt(self) -> None:
        self._stop_periodic()  # a periodic dump in progress must not hold a SIGKILL up

    def exited(self, status: int, *, stop_requested: bool) -> None:
        self._stop_periodic()
        if status == 0 and not stop_requested:
            # A clean exit on its own: the work is done, there is nothing to recover.
            self.engine.publisher.retire(self.policy.identity, ("periodic", "api"))
        if self._claim is not None:
            early = self._finishing or self.clock.monotonic() - self._restored_at < restore.RESTORE_WINDOW
            died_early = not stop_requested and early
            restore.settle(self.engine, self._claim, died_early=died_early)
            self._claim = None
        if self._window is not None:
            self._window.cancel()
            self._window = None

    def closed(self) -> None:
        self._stop_periodic()
        self._tracking.close()
        super().closed()

    def _stop_periodic(self) -> None:
        if self._periodic is not None:
            self.engine.wind_down(self._periodic)
            self._periodic = None
        if self._template is not None:
            self.engine.wind_down(self._template)
            self._template = None
        if self._identify_later is not None:
            self._identify_later.cancel()
            self._identify_later = None

    async def _identify_after(self, delay: float) -> None:
        """Off the stop's path: a pod that lives a while has its identity settled by its stop,
        and what the node's runtime can do asked."""
        await self.clock.sleep(delay)
        await self.identify()
        try:
            await self.engine.runtime_info(self.view.runc)
            await self.engine.memory_tracking(self.view.runc)
        except Exception as exc:  # asked again by the first dump, which reports it
            log.info("%s: the node's runtime could not be asked yet: %s", self.view.id, exc)


def _copy_images(src: str, dst: str) -> None:
    """CRIU's images, copied where containerd asked for them (in-kernel copies)."""
    os.makedirs(dst, mode=0o700, exist_ok=True)
    for name in os.listdir(src):
        shutil.copyfile(os.path.join(src, name), os.path.join(dst, name), follow_symlinks=False)


def _leave_criu_logs_for_cri(view: View, criu_work: str) -> None:
    """Put CRIU's stats-dump and dump.log where containerd's CRI looks for them.

    For runc-v2 the CRI passes its container folder as CRIU's work path; other runtimes get
    no options, yet containerd 2.0-2.1.8 refuse the checkpoint without a stats-dump there
    (2.1.9 reads them from <folder>/ctrd-checkpoint into the archive). The folder is found
    from the snapshot mounts, which live under containerd's root."""
    folder = cri_container_dir(view.rootfs, view.id)
    if not folder:
        return
    for target in (folder, os.path.join(folder, "ctrd-checkpoint")):
        if not os.path.isdir(target):
            continue
        for name in ("stats-dump", "dump.log"):
            with contextlib.suppress(OSError):
                shutil.copyfile(os.path.join(criu_work, name), os.path.join(target, name))
                os.chmod(os.path.join(target, name), 0o600)


def cri_container_dir(rootfs: tuple[mounts.Mount, ...], cid: str) -> str:
    """containerd's CRI folder of container `cid`, found from its snapshot mounts ("" if none)."""
    marker = "/io.containerd.snapshotter.v1."
    for m in rootfs:
        for path in (m.source, *(o.split("=", 1)[1] for o in m.options if "=" in o)):
            if marker in path:
                folder = os.path.join(path.split(marker, 1)[0], "io.containerd.grpc.v1.cri", "containers", cid)
                return folder if os.path.isdir(folder) else ""
    return ""


def checkpointing_for(
    view: View,
    gpu: GpuState | None,
    engine: Callable[[], Engine | None],
    pod_labels: PodLabels | None = None,
    archives: ArchivePolicy | None = None,
) -> Checkpointing:
    """Hot restart when the container's spec asks for it and the store can be used safely
    (`engine` gives None otherwise); plain runc-v2 checkpointing else. `archives` is what
    the node allows for images given at create, in either case."""
    try:
        policy = policy_for(view.spec)
    except InvalidArgumentError as exc:
        log.warning("%s: hot restart disabled: %s", view.id, exc)
        return PlainCheckpoints(view, gpu, archives=archives)
    hot_engine = engine() if policy.enabled else None
    if hot_engine is None:
        return PlainCheckpoints(view, gpu, gpu_lock_timeout=policy.gpu_lock_timeout, archives=archives)
    return HotRestart(view, hot_engine, policy, gpu, pod_labels=pod_labels, archives=archives)
