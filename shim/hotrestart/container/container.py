"""The per-container aggregate: one init process, its execs, its rootfs, its runc calls.

Public coroutines validate against the state machine first, then act, then publish the
event. Lifecycle calls are serialised by a lock; observers (State, Wait, Pids, Stats) never
wait behind a long call such as a checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import os
import re
import shutil
import signal
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from hotrestart.checkpoint.engine import RESTORE_WINDOW, Claim, DumpRequest, Engine, RestoreFailed, Subject
from hotrestart.checkpoint.policy import Policy, policy_for
from hotrestart.checkpoint.rootfs import upperdir_of
from hotrestart.container.process import ExitInfo, Process, StdioPaths
from hotrestart.container.state import Action, State
from hotrestart.container.stdio import ConsoleIO, open_io
from hotrestart.errors import (
    AlreadyExistsError,
    CheckpointError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    RuntimeCommandError,
)
from hotrestart.events import TaskEvents
from hotrestart.gpu.state import GpuState
from hotrestart.reaper import Reaper
from hotrestart.runtime import cgroups, mounts
from hotrestart.runtime.oom import OOMWatcher, memory_cgroup_dir
from hotrestart.runtime.runc import CheckpointOpts, RestoreOpts, Runc
from hotrestart.store.store import Entry

log = logging.getLogger(__name__)

_EXEC_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclasses.dataclass(frozen=True, slots=True)
class CreateConfig:
    id: str
    bundle: str
    rootfs: tuple[mounts.Mount, ...]
    stdio: StdioPaths
    checkpoint: str = ""
    no_pivot: bool = False
    no_new_keyring: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class ExecConfig:
    exec_id: str
    stdio: StdioPaths
    spec: dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class CheckpointConfig:
    path: str
    exit: bool = False
    open_tcp: bool = False
    external_unix_sockets: bool = False
    terminal: bool = False
    file_locks: bool = False
    empty_namespaces: tuple[str, ...] = ()
    cgroups_mode: str = ""
    work_path: str = ""
    options_given: bool = False  # containerd 2.x sends none to a runtime not named runc: leave running


@dataclasses.dataclass(frozen=True, slots=True)
class ProcessState:
    id: str
    exec_id: str
    bundle: str
    pid: int
    state: State
    stdio: StdioPaths
    exit_status: int
    exited_at_ns: int


class _DumpFailed(CheckpointError):
    """A stop-time dump failed and the engine has already said why."""


class Container:
    def __init__(
        self,
        cfg: CreateConfig,
        runc: Runc,
        reaper: Reaper,
        events: TaskEvents,
        hot: Engine | None = None,
        gpu: GpuState | None = None,
    ) -> None:
        self.id = cfg.id
        self.cfg = cfg
        self.bundle = cfg.bundle
        self._runc = runc
        self._reaper = reaper
        self._events = events
        self._lock = asyncio.Lock()
        self.spec = _load_spec(cfg.bundle)
        self.annotations: dict[str, str] = dict(self.spec.get("annotations") or {})
        initial = State.CREATED_CHECKPOINT if cfg.checkpoint else State.CREATED
        self.init = Process(
            cfg.id,
            "",
            cfg.stdio,
            open_io(cfg.stdio.stdin, cfg.stdio.stdout, cfg.stdio.stderr, cfg.stdio.terminal),
            initial,
        )
        self.execs: dict[str, Process] = {}
        self._oom: OOMWatcher | None = None
        self._rootfs_mounted = False
        self._watchers: set[asyncio.Task[None]] = set()
        # Hot restart: the policy from the live spec, a planned restore, the stop in progress.
        self._hot = hot
        self.policy: Policy | None = _policy(self.spec) if hot is not None else None
        self._restore_entry: Entry | None = None
        self._claim: Claim | None = None
        self._note = ""
        self._stopping: asyncio.Task[None] | None = None
        self._stop_done = asyncio.Event()
        self._exit_override: int | None = None
        self._restored_at = 0.0
        self._stop_requested = False  # containerd asked for the init to end (any Kill)
        # One dump at a time per container: stop, API and periodic checkpoints queue here.
        self._dump_lock = asyncio.Lock()
        self._gpu = gpu
        self._periodic: asyncio.Task[None] | None = None

    @property
    def rootfs(self) -> str:
        return os.path.join(self.bundle, "rootfs")

    @property
    def pid_file(self) -> str:
        return os.path.join(self.bundle, "init.pid")

    @property
    def hot_enabled(self) -> bool:
        return self._hot is not None and self.policy is not None and self.policy.enabled

    def _subject(self) -> Subject:
        upper = next((upperdir_of(m.options) for m in self.cfg.rootfs if m.type == "overlay"), "")
        return Subject(self.id, self.bundle, self.spec, self._runc, upper, self.cfg.stdio.terminal, self.init.pid)

    @property
    def own_pid_namespace(self) -> bool:
        namespaces = (self.spec.get("linux") or {}).get("namespaces") or []
        return any(ns.get("type") == "pid" and not ns.get("path") for ns in namespaces)

    # -- create / start -----------------------------------------------------------------------

    async def create(self) -> int:
        async with self._lock:
            try:
                if self.cfg.rootfs:
                    mounts.mount_all(list(self.cfg.rootfs), self.rootfs)
                    self._rootfs_mounted = True
                if self.init.state is State.CREATED and self.hot_enabled:
                    await self._plan_restore()
                if self.init.state is State.CREATED:
                    await self._run_init(self._runc_create)
            except BaseException:
                self.init.io.close()
                self._unmount()
                raise
            self._events.create(
                self.id,
                self.bundle,
                [(m.type, m.source, m.options) for m in self.cfg.rootfs],
                self.cfg.stdio.stdin,
                self.cfg.stdio.stdout,
                self.cfg.stdio.stderr,
                self.cfg.stdio.terminal,
                self.cfg.checkpoint,
                self.init.pid,
            )
            return self.init.pid

    async def _plan_restore(self) -> None:
        assert self._hot is not None and self.policy is not None
        try:
            entry, why = await self._hot.find(self.spec, self.policy, self._runc)
        except Exception as exc:
            entry, why = None, f"checkpoint lookup failed: {exc}"
        if entry is None:
            if why != "no checkpoint":
                log.warning("%s: starting cold: %s", self.id, why)
                self._note = f"hotrestart: starting cold: {why}"
            return
        self._restore_entry = entry
        self.init.sm.advance(Action.PLAN_RESTORE)
        log.info("%s: will restore from checkpoint %s", self.id, entry.id)

    async def _runc_create(self, console_socket: str) -> None:
        await self._runc.create(
            self.id,
            self.bundle,
            self.pid_file,
            self.init.io.runc_stdio(),
            console_socket=console_socket,
            no_pivot=self.cfg.no_pivot,
            no_new_keyring=self.cfg.no_new_keyring,
        )

    async def _runc_restore(
        self, console_socket: str, image_path: str = "", keep_tcp: bool | None = None, work_path: str = ""
    ) -> None:
        """runc restore into this (new) bundle; `keep_tcp` is set for hot-restart images,
        which are dumped with established connections and need them restored or closed."""
        work = work_path or os.path.join(self.bundle, "restore-work")
        os.makedirs(work, mode=0o700, exist_ok=True)
        hot = keep_tcp is not None
        opts = RestoreOpts(
            tcp_established=bool(keep_tcp),
            file_locks=hot,
            image_path=image_path or self.cfg.checkpoint,
            bundle=self.bundle,
            pid_file=self.pid_file,
            work_path=work,
            console_socket=console_socket,
            no_pivot=self.cfg.no_pivot,
            shell_job=self.cfg.stdio.terminal,
        )
        if hot and not keep_tcp:
            # runc has no --tcp-close; CRIU takes it from a config file named by the spec.
            with _criu_config(self.bundle, "tcp-close\n"):
                await self._runc.restore(self.id, opts, self.init.io.runc_stdio())
        else:
            await self._runc.restore(self.id, opts, self.init.io.runc_stdio())

    async def _run_init(self, launch: Any) -> None:
        """Run `launch` (runc create or restore) and start watching the init process it leaves."""
        since = time.monotonic()
        io = self.init.io
        if self._note:
            io.note(self._note)  # ahead of anything the process writes
            self._note = ""
        receive = asyncio.ensure_future(io.receive_master()) if isinstance(io, ConsoleIO) else None
        try:
            await launch(io.console_socket)
            if receive is not None:
                await receive
        except BaseException:
            if receive is not None:
                receive.cancel()
                with contextlib.suppress(BaseException):
                    await receive
            raise
        await io.started()
        self.init.pid = _read_pid(self.pid_file)
        self._start_oom_watch()
        self._watch(self.init, since)

    async def start(self, exec_id: str = "") -> int:
        if exec_id:
            return await self._start_exec(exec_id)
        async with self._lock:
            state = self.init.state
            self.init.sm.check(Action.START)
            if state is State.CREATED_CHECKPOINT and self._restore_entry is not None:
                await self._hot_restore(self._restore_entry)
            elif state is State.CREATED_CHECKPOINT:
                await self._run_init(self._runc_restore)
                if self._gpu is not None:
                    await self._gpu.after_restore(cgroups.procs(self.init.pid))
            else:
                await self._runc.start(self.id)
            if not self.init.exited:
                self.init.sm.advance(Action.START)
                self._start_periodic()
            self._events.start(self.id, self.init.pid)
            return self.init.pid

    async def _hot_restore(self, entry: Entry) -> None:
        """Restore from the planned checkpoint; on any failure start cold in the same call."""
        assert self._hot is not None and self.policy is not None

        async def launch(image_path: str, work_path: str, keep_tcp: bool) -> None:
            restore = functools.partial(
                self._runc_restore, image_path=image_path, keep_tcp=keep_tcp, work_path=work_path
            )
            await self._run_init(restore)

        manifest = entry.manifest
        taken = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(manifest.created_at)) if manifest else "?"
        self._note = (
            f"hotrestart: restoring from checkpoint {entry.id} taken on {manifest.node if manifest else '?'} at {taken}"
        )
        try:
            self._claim = await self._hot.restore(self._subject(), entry, self.policy, launch)
        except RestoreFailed as exc:
            log.warning("%s: restore from %s failed, starting cold: %s", self.id, entry.id, exc)
            self._note = f"hotrestart: restore from checkpoint {entry.id} failed ({exc}); started cold"
            await self._cold_start_after_failed_restore()
            return
        self._restored_at = time.monotonic()
        asyncio.get_running_loop().call_later(RESTORE_WINDOW, self._restore_proved)

    async def _cold_start_after_failed_restore(self) -> None:
        launched = self.init.pid != 0
        if launched:
            # The restore ran and failed afterwards (GPU state): its process is killed below,
            # and must not be reported as this container's exit, nor keep the stdio.
            for watcher in list(self._watchers):
                watcher.cancel()
            if self._oom is not None:
                self._oom.stop()
                self._oom = None
        if launched:
            # Fresh stdio for the cold start, holding containerd's FIFOs before the old copies end.
            stdio = self.cfg.stdio
            spent, self.init.io = self.init.io, open_io(stdio.stdin, stdio.stdout, stdio.stderr, stdio.terminal)
            self.init.io.attach()
            self.init.pid = 0
        with contextlib.suppress(Exception):
            await self._runc.delete(self.id, force=True)
        if launched:
            await spent.drained(1.0)
            spent.close()
        self._reset_rootfs()
        await self._run_init(self._runc_create)
        await self._runc.start(self.id)

    def _reset_rootfs(self) -> None:
        """Give a cold start the pristine root filesystem: drop what a failed restore applied."""
        upper = self._subject().upperdir
        if not self._rootfs_mounted or not upper:
            return
        self._unmount()
        for name in os.listdir(upper):
            path = os.path.join(upper, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        mounts.mount_all(list(self.cfg.rootfs), self.rootfs)
        self._rootfs_mounted = True

    def _restore_proved(self) -> None:
        """The restored container outlived the window: its checkpoint is used up."""
        if self._claim is not None and self._hot is not None and not self.init.exited:
            self._hot.settle(self._claim, died_early=False)
            self._claim = None

    # -- exec ---------------------------------------------------------------------------------

    async def exec(self, cfg: ExecConfig) -> None:
        if not _EXEC_ID.match(cfg.exec_id):
            raise InvalidArgumentError(f"invalid exec id {cfg.exec_id!r}")
        async with self._lock:
            self.init.sm.check(Action.EXEC)
            if cfg.exec_id in self.execs:
                raise AlreadyExistsError(f"id {cfg.exec_id}: already exists")
            io = open_io(cfg.stdio.stdin, cfg.stdio.stdout, cfg.stdio.stderr, cfg.stdio.terminal)
            proc = Process(self.id, cfg.exec_id, cfg.stdio, io)
            self.execs[cfg.exec_id] = proc
            spec_path = self._exec_spec_path(cfg.exec_id)
            fd = os.open(spec_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(cfg.spec, f)
        self._events.exec_added(self.id, cfg.exec_id)

    def _exec_spec_path(self, exec_id: str) -> str:
        return os.path.join(self.bundle, f".exec-{exec_id}.json")

    async def _start_exec(self, exec_id: str) -> int:
        proc = self.process(exec_id)
        proc.sm.check(Action.START)
        self.init.sm.check(Action.EXEC)
        since = time.monotonic()
        pid_file = os.path.join(self.bundle, f".exec-{exec_id}.pid")
        io = proc.io
        receive = asyncio.ensure_future(io.receive_master()) if isinstance(io, ConsoleIO) else None
        try:
            await self._runc.exec(
                self.id, self._exec_spec_path(exec_id), pid_file, io.runc_stdio(), console_socket=io.console_socket
            )
            if receive is not None:
                await receive
        except BaseException:
            if receive is not None:
                receive.cancel()
            io.close()
            proc.set_exited(255)
            raise
        finally:
            with contextlib.suppress(OSError):
                os.unlink(self._exec_spec_path(exec_id))
        await io.started()
        proc.pid = _read_pid(pid_file)
        with contextlib.suppress(OSError):
            os.unlink(pid_file)
        if not proc.exited:
            proc.sm.advance(Action.START)
        self._watch(proc, since)
        self._events.exec_started(self.id, exec_id, proc.pid)
        return proc.pid

    # -- exits --------------------------------------------------------------------------------

    def _watch(self, proc: Process, since: float) -> None:
        task = asyncio.ensure_future(self._on_exit(proc, since))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _on_exit(self, proc: Process, since: float) -> None:
        status = await self._reaper.wait_for(proc.pid, since)
        if proc is self.init and self._stopping is not None:
            # The exit may come from CRIU ending a dumped container: report it as the stop
            # signal would have, once the checkpoint attempt has settled.
            await self._stop_done.wait()
            if self._exit_override is not None:
                status = self._exit_override
        if proc is self.init:
            self._stop_periodic()
            if status == 0 and not self._stop_requested and self.hot_enabled:
                # A clean exit on its own: the work is done, there is nothing to recover.
                assert self._hot is not None and self.policy is not None
                with contextlib.suppress(OSError):
                    self._hot.retire(self.policy.identity, ("periodic", "api"))
        if proc is self.init and self._claim is not None and self._hot is not None:
            died_early = not self._stop_requested and time.monotonic() - self._restored_at < RESTORE_WINDOW
            self._hot.settle(self._claim, died_early=died_early)
            self._claim = None
        # Output must reach containerd before the exit does, or CRI logs lose their tail.
        await proc.io.drained(2.0)
        if proc is self.init:
            if self._oom is not None:
                self._oom.poll()
            await self._end_execs()
        proc.set_exited(status)
        proc.io.close()
        self._events.exit(self.id, proc.id, proc.pid, status, proc.exited_at_ns)

    async def _end_execs(self) -> None:
        """The init is gone: execs end too, and their exits go out before the init's."""
        running = [p for p in self.execs.values() if p.state is State.RUNNING and not p.exited]
        if not running:
            return
        if not self.own_pid_namespace:
            with contextlib.suppress(Exception):
                await self._runc.kill(self.id, signal.SIGKILL, all_processes=True)
        await asyncio.wait([asyncio.ensure_future(p.wait()) for p in running], timeout=2.0)

    def _start_oom_watch(self) -> None:
        cgroup = memory_cgroup_dir(self.init.pid)
        if cgroup is None:
            return
        watcher = OOMWatcher(cgroup, lambda: self._events.oom(self.id))
        try:
            watcher.start()
        except OSError as exc:
            log.warning("%s: no OOM notifications: %s", self.id, exc)
            return
        self._oom = watcher

    # -- signals, pause, update ---------------------------------------------------------------

    async def kill(self, exec_id: str, sig: int, all_processes: bool) -> None:
        if exec_id:
            proc = self.process(exec_id)
            proc.sm.check(Action.KILL)
            if proc.exited:
                raise NotFoundError("process already finished")
            try:
                os.kill(proc.pid, sig)
            except ProcessLookupError as exc:
                raise NotFoundError("process already finished") from exc
            return
        self.init.sm.check(Action.KILL)
        if self.init.state is State.CREATED_CHECKPOINT:
            raise NotFoundError("process already finished")
        self._stop_requested = True
        if sig != signal.SIGKILL and self.hot_enabled and self.init.state is State.RUNNING:
            # A stop: checkpoint instead of delivering the signal (a second one is absorbed).
            if self._stopping is None:
                self._stopping = asyncio.ensure_future(self._checkpoint_then_stop(sig))
            return
        if sig == signal.SIGKILL:
            self._stop_periodic()  # a periodic dump in progress must not hold the kill up
        if self._stopping is not None and not self._stopping.done():
            # A later SIGKILL always wins over a checkpoint in progress.
            self._stopping.cancel()
            with contextlib.suppress(BaseException):
                await self._stopping
        try:
            await self._runc.kill(self.id, sig, all_processes=all_processes)
        except RuntimeCommandError as exc:
            if self.init.exited or "not running" in exc.detail or "already finished" in exc.detail:
                raise NotFoundError("process already finished") from exc
            raise

    async def _checkpoint_then_stop(self, sig: int) -> None:
        assert self._hot is not None and self.policy is not None
        ok = False
        since = time.monotonic()
        try:
            async with self._dump_lock:  # a periodic or API checkpoint in progress finishes first
                left = self.policy.timeout - (time.monotonic() - since)
                if left > 0.5 and self.init.state is State.RUNNING:
                    async with self._prepared(True) as prep:
                        ok = await self._hot.checkpoint_on_stop(
                            self._subject(), self.policy, left, around=prep.freeze, gpu=prep.gpu
                        )
                        if not ok:
                            raise _DumpFailed("the dump failed")  # resumes GPU state on the way out
        except asyncio.CancelledError:
            cgroups.thaw(self.init.pid)
            raise
        except _DumpFailed:
            pass  # the engine has logged why
        except Exception as exc:
            log.warning("%s: checkpoint on stop failed: %s", self.id, exc)
        finally:
            if ok:
                self._exit_override = 128 + sig
            self._stop_done.set()
        if not ok:
            cgroups.thaw(self.init.pid)
            log.info("%s: delivering signal %d the ordinary way", self.id, sig)
            with contextlib.suppress(Exception):
                await self._runc.kill(self.id, sig)

    async def pause(self) -> None:
        # The freezer is CRIU's during a dump (runc would call the container not running).
        async with self._lock, self._dump_lock:
            self.init.sm.check(Action.PAUSE)
            await self._runc.pause(self.id)
            self.init.sm.advance(Action.PAUSE)
        self._events.paused(self.id)

    async def resume(self) -> None:
        async with self._lock, self._dump_lock:
            self.init.sm.check(Action.RESUME)
            await self._runc.resume(self.id)
            self.init.sm.advance(Action.RESUME)
        self._events.resumed(self.id)

    async def update(self, resources: dict[str, Any]) -> None:
        async with self._lock:
            self.init.sm.check(Action.UPDATE)
            await self._runc.update(self.id, resources)

    async def checkpoint(self, cfg: CheckpointConfig) -> None:
        async with self._lock:
            self.init.sm.check(Action.CHECKPOINT)
            os.makedirs(cfg.path, mode=0o700, exist_ok=True)
            if self.hot_enabled and self._stopping is None:
                await self._checkpoint_to_store(cfg)
            else:
                await self._runc_checkpoint(cfg)
        self._events.checkpointed(self.id, cfg.path)

    async def _checkpoint_to_store(self, cfg: CheckpointConfig) -> None:
        """An API checkpoint of a hot-restart container: dump once into fast private storage,
        hand containerd its copy of the images, and keep the dump as the identity's newest
        restore point (published in the background)."""
        assert self._hot is not None and self.policy is not None
        req = DumpRequest("api", leave_running=not cfg.exit)
        if cfg.options_given:
            req = DumpRequest(
                "api",
                leave_running=not cfg.exit,
                tcp_established=cfg.open_tcp,
                file_locks=cfg.file_locks,
                ext_unix_sk=cfg.external_unix_sockets,
                empty_ns=cfg.empty_namespaces,
                cgroups_mode=cfg.cgroups_mode,
            )
        async with self._dump_lock, self._prepared(cfg.exit) as prep:
            dumped = await self._hot.dump(self._subject(), self.policy, req, None, around=prep.freeze, gpu=prep.gpu)
        try:
            await asyncio.to_thread(_copy_images, dumped.images, cfg.path)
        except BaseException:
            self._hot.discard(dumped)
            raise
        if not cfg.options_given:
            await asyncio.to_thread(self._leave_criu_logs_for_cri, os.path.join(dumped.work, "criu"))
        self._hot.publish_later(dumped)

    def _leave_criu_logs_for_cri(self, criu_work: str) -> None:
        """Put CRIU's stats-dump and dump.log where containerd's CRI looks for them.

        For runc-v2 the CRI passes its container folder as CRIU's work path; other runtimes get
        no options, yet containerd 2.0-2.1.8 refuse the checkpoint without a stats-dump there
        (2.1.9 reads them from <folder>/ctrd-checkpoint into the archive). The folder is found
        from the snapshot mounts, which live under containerd's root."""
        folder = _cri_container_dir(self.cfg.rootfs, self.id)
        if not folder:
            return
        for target in (folder, os.path.join(folder, "ctrd-checkpoint")):
            if not os.path.isdir(target):
                continue
            for name in ("stats-dump", "dump.log"):
                with contextlib.suppress(OSError):
                    shutil.copyfile(os.path.join(criu_work, name), os.path.join(target, name))
                    os.chmod(os.path.join(target, name), 0o600)

    async def _runc_checkpoint(self, cfg: CheckpointConfig) -> None:
        work = cfg.work_path or os.path.join(self.bundle, "criu-work")
        os.makedirs(work, mode=0o700, exist_ok=True)
        opts = CheckpointOpts(
            image_path=cfg.path,
            work_path=work,
            leave_running=not cfg.exit,
            tcp_established=cfg.open_tcp,
            ext_unix_sk=cfg.external_unix_sockets,
            shell_job=cfg.terminal or self.cfg.stdio.terminal,
            file_locks=cfg.file_locks,
            empty_ns=cfg.empty_namespaces,
            manage_cgroups_mode=cfg.cgroups_mode,
        )
        try:
            async with self._dump_lock, self._prepared(cfg.exit) as prep, prep.freeze():
                await self._runc.checkpoint(self.id, opts)
        except RuntimeCommandError as exc:
            dump_log = os.path.join(work, "dump.log")
            if os.path.exists(dump_log):
                target = os.path.join(self.bundle, "criu-dump.log")
                with contextlib.suppress(OSError):
                    os.replace(dump_log, target)
                raise RuntimeCommandError(exc.argv, exc.returncode, f"{exc.detail} (see {target})", exc.verb) from exc
            raise

    @contextlib.asynccontextmanager
    async def _prepared(self, exits: bool) -> AsyncIterator[Prepared]:
        """Get the container ready for a dump: GPU state first, then the freeze (`freeze`,
        entered by the caller around `runc checkpoint` alone, so that work folders and the like
        are made while the application still runs).

        GPU processes are locked and checkpointed before anything freezes them (a lock after a
        freeze hangs); a container containerd paused is thawed for that and paused again at
        the end. After a leave-running dump, or any failure, GPU state is resumed."""
        paused = self.init.state is State.PAUSED
        # The cgroup's list, not `runc ps`: this runs before every dump, stops included.
        suspension = await self._gpu.find(cgroups.procs(self.init.pid)) if self._gpu else None
        if suspension is None:
            yield Prepared({}, lambda: self._quiesced(exits, keep_frozen=paused))
            return
        assert self._gpu is not None
        gpu = self._gpu
        if paused:
            cgroups.thaw(self.init.pid)
        try:
            lock_ms = int(self.policy.gpu_lock_timeout * 1000) if self.policy is not None else None
            await gpu.suspend(suspension, lock_ms)
        except BaseException:
            if paused:
                await asyncio.to_thread(cgroups.freeze_quiescent, self.init.pid)
            raise
        ok = False
        try:
            if suspension.owner == "shim":
                yield Prepared(suspension.record, lambda: self._quiesced(exits, keep_frozen=False))
            else:  # CRIU's CUDA plugin locks first and freezes by itself
                yield Prepared(suspension.record, _no_freeze)
            ok = True
        finally:
            if not (exits and ok):
                cgroups.thaw(self.init.pid)
                await gpu.resume(suspension, quiet=True)
                if paused:
                    await asyncio.to_thread(cgroups.freeze_quiescent, self.init.pid)

    @contextlib.asynccontextmanager
    async def _quiesced(self, exits: bool, keep_frozen: bool) -> AsyncIterator[None]:
        """Hand CRIU the container frozen with every process seizable; thaw it afterwards
        unless it is to stay frozen (containerd pauses a task around its own checkpoint).

        A freeze, CRIU's own or containerd's pause, can catch a process in the middle of
        vfork(); CRIU then waits out its whole timeout and fails. See cgroups.freeze_quiescent."""
        freezing = asyncio.ensure_future(asyncio.to_thread(cgroups.freeze_quiescent, self.init.pid))
        try:
            if not await asyncio.shield(freezing):
                log.info("%s: a process stays inside vfork(); dumping anyway", self.id)
        except asyncio.CancelledError:
            # The freezing thread runs on; never leave its freeze behind.
            await asyncio.wait([freezing])
            cgroups.thaw(self.init.pid)
            raise
        try:
            yield
        finally:
            if exits or not keep_frozen:
                cgroups.thaw(self.init.pid)

    # -- periodic checkpoints -------------------------------------------------------------------

    def _start_periodic(self) -> None:
        if self.hot_enabled and self.policy is not None and self.policy.interval > 0 and self._periodic is None:
            self._periodic = asyncio.ensure_future(self._periodic_checkpoints(self.policy.interval))

    def _stop_periodic(self) -> None:
        if self._periodic is not None:
            self._periodic.cancel()
            self._periodic = None

    async def _periodic_checkpoints(self, interval: float) -> None:
        """Leave-running checkpoints on a schedule. A failure is logged and retried at the next
        tick; a tick is skipped while the previous checkpoint is still being published."""
        assert self._hot is not None and self.policy is not None
        while not self.init.exited:
            await asyncio.sleep(interval)
            if self._stopping is not None or self.init.exited:
                return
            if self._hot.publishing(self.policy.identity, "periodic"):
                log.info("%s: previous checkpoint still being published; skipping this interval", self.id)
                continue
            try:
                async with self._dump_lock:
                    # A paused container is dumped as it is (containerd pauses around its own checkpoints).
                    if self._stopping is not None or self.init.state not in (State.RUNNING, State.PAUSED):
                        continue
                    # _prepared and its freeze thaw on every way out, and keep a paused container paused.
                    req = DumpRequest("periodic", leave_running=True)
                    async with self._prepared(False) as prep:
                        dumped = await self._hot.dump(
                            self._subject(), self.policy, req, self.policy.timeout, around=prep.freeze, gpu=prep.gpu
                        )
                self._hot.publish_later(dumped)
            except Exception as exc:
                log.warning("%s: periodic checkpoint failed (next in %.0fs): %s", self.id, interval, exc)

    # -- observers ----------------------------------------------------------------------------

    def process(self, exec_id: str) -> Process:
        if not exec_id:
            return self.init
        proc = self.execs.get(exec_id)
        if proc is None:
            raise NotFoundError(f"process {exec_id} does not exist")
        return proc

    def state(self, exec_id: str) -> ProcessState:
        proc = self.process(exec_id)
        return ProcessState(
            self.id, exec_id, self.bundle, proc.pid, proc.state, proc.stdio, proc.exit_status, proc.exited_at_ns
        )

    async def wait(self, exec_id: str) -> ExitInfo:
        return await self.process(exec_id).wait()

    async def pids(self) -> list[tuple[int, str]]:
        """(pid, exec id or "") for every process in the container."""
        if self.init.exited or self.init.pid == 0:
            return []
        try:
            pids = await self._runc.ps(self.id)
        except RuntimeCommandError:
            return [(self.init.pid, "")] if not self.init.exited else []
        by_pid = {p.pid: p.exec_id for p in self.execs.values() if p.pid}
        return [(pid, by_pid.get(pid, "")) for pid in pids]

    async def stats(self) -> dict[str, Any]:
        self.init.sm.check(Action.STATS)
        return await self._runc.stats(self.id)

    def resize_pty(self, exec_id: str, width: int, height: int) -> None:
        self.process(exec_id).io.resize(width, height)

    def close_io(self, exec_id: str) -> None:
        self.process(exec_id).io.close_stdin()

    # -- delete -------------------------------------------------------------------------------

    async def delete(self, exec_id: str = "") -> ExitInfo:
        if exec_id:
            proc = self.process(exec_id)
            proc.sm.check(Action.DELETE)
            proc.sm.advance(Action.DELETE)
            del self.execs[exec_id]
            proc.io.close()
            return proc.exit_info()
        async with self._lock:
            self.init.sm.check(Action.DELETE)
            if self.init.state is not State.CREATED_CHECKPOINT:
                try:
                    await self._runc.delete(self.id, force=self.init.state is State.CREATED)
                except NotFoundError:
                    pass
            if self.init.state is State.CREATED and self.init.pid:
                # A created-but-never-started init was killed by `delete --force`; report it.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(5):
                        await self.init.wait()
            self.init.sm.advance(Action.DELETE)
            self._stop_periodic()
            self.init.io.close()
            for proc in self.execs.values():
                proc.io.close()
            if self._oom is not None:
                self._oom.stop()
            self._unmount()
        info = self.init.exit_info()
        self._events.delete(self.id, info.pid, info.status, info.exited_at_ns)
        return info

    def _unmount(self) -> None:
        if self._rootfs_mounted:
            try:
                mounts.unmount_all(self.rootfs)
            except OSError as exc:
                log.warning("%s: %s", self.id, exc)
            self._rootfs_mounted = False

    def has_live_processes(self) -> bool:
        return self.init.state is not State.DELETED


@dataclasses.dataclass(frozen=True)
class Prepared:
    gpu: dict[str, Any]  # the manifest's record of GPU state ({} without GPU processes)
    freeze: Callable[[], contextlib.AbstractAsyncContextManager[None]]


@contextlib.asynccontextmanager
async def _no_freeze() -> AsyncIterator[None]:
    yield


def _policy(spec: dict[str, Any]) -> Policy | None:
    try:
        return policy_for(spec)
    except InvalidArgumentError as exc:
        log.warning("hot restart disabled: %s", exc)
        return None


@contextlib.contextmanager
def _criu_config(bundle: str, text: str) -> Any:
    """Point runc at a CRIU config file (annotation org.criu.config) for one command."""
    spec_path = os.path.join(bundle, "config.json")
    conf = os.path.join(bundle, "criu-restore.conf")
    with open(spec_path) as f:
        original = f.read()
    spec = json.loads(original)
    spec.setdefault("annotations", {})["org.criu.config"] = conf
    with open(conf, "w") as f:
        f.write(text)
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    try:
        yield
    finally:
        with open(spec_path, "w") as f:
            f.write(original)
        with contextlib.suppress(OSError):
            os.unlink(conf)


def _cri_container_dir(rootfs: tuple[mounts.Mount, ...], cid: str) -> str:
    """containerd's CRI folder of container `cid`, found from its snapshot mounts ("" if none)."""
    marker = "/io.containerd.snapshotter.v1."
    for m in rootfs:
        for path in (m.source, *(o.split("=", 1)[1] for o in m.options if "=" in o)):
            if marker in path:
                folder = os.path.join(path.split(marker, 1)[0], "io.containerd.grpc.v1.cri", "containers", cid)
                return folder if os.path.isdir(folder) else ""
    return ""


def _copy_images(src: str, dst: str) -> None:
    """CRIU's images, copied where containerd asked for them (in-kernel copies)."""
    os.makedirs(dst, mode=0o700, exist_ok=True)
    for name in os.listdir(src):
        shutil.copyfile(os.path.join(src, name), os.path.join(dst, name), follow_symlinks=False)


def _load_spec(bundle: str) -> dict[str, Any]:
    try:
        with open(os.path.join(bundle, "config.json")) as f:
            spec: dict[str, Any] = json.load(f)
            return spec
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise InvalidArgumentError(f"bundle {bundle}: invalid config.json: {exc}") from exc


def _read_pid(path: str) -> int:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError) as exc:
        raise FailedPreconditionError(f"runc left no usable pid file {path}: {exc}") from exc
