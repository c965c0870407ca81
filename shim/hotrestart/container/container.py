"""The per-container aggregate: one init process, its execs, its rootfs, its runc calls.

Public coroutines validate against the state machine first, then act (what a call does in
each state is in `init_states`), then publish the event. Lifecycle calls are serialised by
a lock; observers (State, Wait, Pids, Stats) never wait behind a long call such as a
checkpoint. Everything about checkpoints is behind `seam.Checkpointing`, asked and never
asking back.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import re
import shutil
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

from hotrestart import telemetry
from hotrestart.container.config import CreateConfig, ExecConfig, ProcessState, load_spec
from hotrestart.container.init_states import BEHAVIOUR
from hotrestart.container.launch import exec_pid_path, exec_spec_path, launch, read_pid, write_exec_spec
from hotrestart.container.process import ExitInfo, Process
from hotrestart.container.seam import CheckpointConfig, Checkpointing, NoCheckpoints, View
from hotrestart.container.state import Action, State
from hotrestart.container.stdio import open_io
from hotrestart.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    RuntimeCommandError,
)
from hotrestart.events import TaskEvents
from hotrestart.handoff import INIT_PID_FILE
from hotrestart.reaper import Reaper
from hotrestart.runtime import criu, mounts, uts
from hotrestart.runtime.oom import OOMWatcher, memory_cgroup_dir
from hotrestart.runtime.runc import RestoreOpts, Runc

log = logging.getLogger(__name__)

_EXEC_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class Container:
    def __init__(
        self,
        cfg: CreateConfig,
        runc: Runc,
        reaper: Reaper,
        events: TaskEvents,
        checkpointing: Callable[[View], Checkpointing] | None = None,
    ) -> None:
        self.id = cfg.id
        self.cfg = cfg
        self.bundle = cfg.bundle
        self.runc = runc
        self._reaper = reaper
        self._events = events
        self._lock = asyncio.Lock()
        # Cleared while Start runs: an init that exits before its start event is out holds
        # its exit event back (containerd must see start, then exit).
        self._not_starting = asyncio.Event()
        self._not_starting.set()
        self.spec = load_spec(cfg.bundle)
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
        self.view = View(cfg.id, cfg.bundle, self.spec, runc, cfg.rootfs, cfg.stdio.terminal)
        self.checkpointing: Checkpointing = (checkpointing or NoCheckpoints)(self.view)
        self._note = ""  # for the init's output, ahead of anything it writes
        self._given_images = ""  # images given at create, as checked and copied by checkpointing
        self._stopping: asyncio.Task[None] | None = None  # a stop being checkpointed
        self._stop_done = asyncio.Event()
        self._exit_override: int | None = None
        self._stop_requested = False  # containerd asked for the init to end (any Kill)

    @property
    def rootfs(self) -> str:
        return os.path.join(self.bundle, "rootfs")

    @property
    def pid_file(self) -> str:
        return os.path.join(self.bundle, INIT_PID_FILE)

    @property
    def own_pid_namespace(self) -> bool:
        namespaces = (self.spec.get("linux") or {}).get("namespaces") or []
        return any(ns.get("type") == "pid" and not ns.get("path") for ns in namespaces)

    def _moved(self) -> None:
        """Keep what checkpointing sees of the init current."""
        self.view.pid = self.init.pid
        self.view.paused = self.init.state is State.PAUSED
        self.view.running = self.init.state is State.RUNNING and not self.init.exited

    # -- create / start -----------------------------------------------------------------------

    async def create(self) -> int:
        async with self._lock:
            try:
                if self.cfg.rootfs:
                    mounts.mount_all(list(self.cfg.rootfs), self.rootfs)
                    self._rootfs_mounted = True
                if self.init.state is State.CREATED_CHECKPOINT:
                    # Checked now, so that a refused archive fails the create with its reason.
                    self._given_images = await self.checkpointing.admit_images(self.cfg.checkpoint)
                if self.init.state is State.CREATED and self.checkpointing.hot:
                    plan = await self.checkpointing.plan_restore()
                    self._note = plan.note
                    if plan.restore:
                        self.init.sm.advance(Action.PLAN_RESTORE)
                if self.init.state is State.CREATED:
                    await self._run_init(self._runc_create)
            except BaseException:
                self.checkpointing.closed()
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

    async def start(self, exec_id: str = "") -> int:
        if exec_id:
            return await self._start_exec(exec_id)
        async with self._lock:
            self.init.sm.check(Action.START)
            self._not_starting.clear()
            try:
                await BEHAVIOUR[self.init.state](self).start()
                if not self.init.exited:
                    self.init.sm.advance(Action.START)
                    self._moved()
                    self.checkpointing.started()
                self._events.start(self.id, self.init.pid)
            finally:
                self._not_starting.set()
            return self.init.pid

    async def _runc_create(self, console_socket: str) -> None:
        await self.runc.create(
            self.id,
            self.bundle,
            self.pid_file,
            self.init.io.runc_stdio(),
            console_socket=console_socket,
            no_pivot=self.cfg.no_pivot,
            no_new_keyring=self.cfg.no_new_keyring,
        )

    async def restore_from_images(self) -> None:
        """Start by restoring the CRIU images containerd gave at create."""
        opts = self._restore_opts(self._given_images, os.path.join(self.bundle, "restore-work"), hot=False)
        await self._run_init(lambda console: self._runc_restore(opts, console))
        await self.checkpointing.finish_restore()

    async def hot_restore(self) -> None:
        """Start by restoring the planned hot-restart checkpoint; on any failure start cold
        in the same call (fresh stdio, pristine root filesystem)."""
        try:
            images = await self.checkpointing.prepare_restore()
            self._note = images.note
            # Hot-restart images hold established connections: restored, or closed by CRIU.
            opts = self._restore_opts(images.image_path, images.work_path, hot=True, keep_tcp=images.keep_tcp)
            opts = dataclasses.replace(opts, lazy_pages=images.lazy)
            with telemetry.span("hotrestart.restore.restore", container=self.id, keep_tcp=images.keep_tcp):
                await self._run_init(lambda console: self._runc_restore(opts, console, close_tcp=not images.keep_tcp))
            await self.checkpointing.finish_restore()
        except Exception as exc:
            self._note = self.checkpointing.abandon_restore(exc)
            await self._cold_start_after_failed_restore()
        except BaseException as exc:
            self.checkpointing.abandon_restore(exc)
            raise

    def _restore_opts(self, image_path: str, work: str, *, hot: bool, keep_tcp: bool = False) -> RestoreOpts:
        os.makedirs(work, mode=0o700, exist_ok=True)
        return RestoreOpts(
            tcp_established=keep_tcp,
            file_locks=hot,
            image_path=image_path,
            bundle=self.bundle,
            pid_file=self.pid_file,
            work_path=work,
            no_pivot=self.cfg.no_pivot,
            shell_job=self.cfg.stdio.terminal,
            # runc has made this container's cgroup from the live spec (under the systemd
            # driver a new scope in the new pod's slice) and hands it to CRIU as the root: soft
            # leaves its limits as the spec set them and only recreates cgroups the workload had
            # made inside its own. Full or strict would write the old pod's values over them.
            manage_cgroups_mode="soft",
        )

    async def _runc_restore(self, opts: RestoreOpts, console_socket: str, *, close_tcp: bool = False) -> None:
        opts = dataclasses.replace(opts, console_socket=console_socket)
        # CRIU writes the checkpoint's hostname into the pod's UTS namespace: put the pod's back.
        hostname = await asyncio.to_thread(uts.pod_hostname, self.spec)
        try:
            if close_tcp:
                # runc has no --tcp-close; CRIU takes it from a config file named by the spec.
                with criu.config_for(self.bundle, "tcp-close\n"):
                    await self.runc.restore(self.id, opts, self.init.io.runc_stdio())
            else:
                await self.runc.restore(self.id, opts, self.init.io.runc_stdio())
        finally:
            with contextlib.suppress(FailedPreconditionError):  # no process: the pod's name alone
                pid = 0
                pid = read_pid(self.pid_file)
            await asyncio.to_thread(uts.put_back, pid, self.spec, hostname)

    async def _run_init(self, run: Callable[[str], Awaitable[None]]) -> None:
        """Run `run` (runc create or restore) and start watching the init process it leaves."""
        since = time.monotonic()
        if self._note:
            self.init.io.note(self._note)  # ahead of anything the process writes
            self._note = ""
        self.init.pid = await launch(self.init.io, run, self.pid_file)
        self._moved()
        self._start_oom_watch()
        self._watch(self.init, since)

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
            # Fresh stdio for the cold start, holding containerd's FIFOs before the old copies end.
            stdio = self.cfg.stdio
            spent, self.init.io = self.init.io, open_io(stdio.stdin, stdio.stdout, stdio.stderr, stdio.terminal)
            self.init.io.attach()
            self.init.pid = 0
        try:
            await self.runc.delete(self.id, force=True)
        except Exception as exc:  # usually: the restore left no container
            log.debug("%s: runc delete after a failed restore: %s", self.id, exc)
        if launched:
            await spent.drained(1.0)
            spent.close()
        self._reset_rootfs()
        await self._run_init(self._runc_create)
        await self.runc.start(self.id)

    def _reset_rootfs(self) -> None:
        """Give a cold start the pristine root filesystem: drop what a failed restore applied."""
        upper = self.view.upperdir
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
            write_exec_spec(self.bundle, cfg.exec_id, cfg.spec)
        self._events.exec_added(self.id, cfg.exec_id)

    async def _start_exec(self, exec_id: str) -> int:
        proc = self.process(exec_id)
        proc.sm.check(Action.START)
        self.init.sm.check(Action.EXEC)
        since = time.monotonic()
        spec, pid_file = exec_spec_path(self.bundle, exec_id), exec_pid_path(self.bundle, exec_id)
        try:
            stdio = proc.io.runc_stdio()
            run = functools.partial(self.runc.exec, self.id, spec, pid_file, stdio)
            proc.pid = await launch(proc.io, lambda console: run(console_socket=console), pid_file)
        except BaseException:
            proc.io.close()
            proc.set_exited(255)
            raise
        finally:
            for path in (spec, pid_file):
                with contextlib.suppress(OSError):
                    os.unlink(path)
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
        oom = self._oom
        if proc is self.init and oom is not None:
            # At once: under the systemd driver the emptied cgroup goes away soon.
            await oom.at_exit(killed=status == 128 + signal.SIGKILL)
        if proc is self.init:
            if self._stopping is not None:
                # The exit may come from CRIU ending a dumped container: report it as the stop
                # signal would have, once the checkpoint attempt has settled.
                await self._stop_done.wait()
                if self._exit_override is not None:
                    status = self._exit_override
            self.view.running = False
            self.checkpointing.exited(status, stop_requested=self._stop_requested)
        # Output must reach containerd before the exit does, or CRI logs lose their tail.
        await proc.io.drained(2.0)
        if proc is self.init:
            if self._oom is not None:
                self._oom.poll()  # a kill noticed while the output drained still goes first
            await self._end_execs()
        if proc is self.init:
            await self._not_starting.wait()
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
                await self.runc.kill(self.id, signal.SIGKILL, all_processes=True)
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

    # -- signals, pause, update, checkpoint ---------------------------------------------------

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
        self._stop_requested = True
        await BEHAVIOUR[self.init.state](self).kill(sig, all_processes)

    def stop_with_checkpoint(self, sig: int) -> None:
        """Checkpoint instead of delivering `sig`; a second stop signal is absorbed."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._checkpoint_then_stop(sig))

    async def cancel_stop(self) -> None:
        """A later signal (SIGKILL above all) wins over a checkpoint in progress."""
        if self._stopping is not None and not self._stopping.done():
            self._stopping.cancel()
            with contextlib.suppress(BaseException):
                await self._stopping

    async def _checkpoint_then_stop(self, sig: int) -> None:
        ok = False
        try:
            ok = await self.checkpointing.checkpoint_for_stop(sig)
        except Exception as exc:
            log.warning("%s: checkpoint on stop failed: %s", self.id, exc)
        finally:
            if ok:
                self._exit_override = 128 + sig
            self._stop_done.set()
        if not ok:
            log.info("%s: delivering signal %d the ordinary way", self.id, sig)
            try:
                await self.runc.kill(self.id, sig)
            except Exception as exc:
                # Nothing else will deliver it: say so (an init that exited meanwhile is fine).
                if not self.init.exited:
                    log.error("%s: signal %d could not be delivered: %s", self.id, sig, exc)

    async def pause(self) -> None:
        # The freezer is CRIU's during a dump (runc would call the container not running).
        async with self._lock, self.checkpointing.exclusive():
            self.init.sm.check(Action.PAUSE)
            await self.runc.pause(self.id)
            self.init.sm.advance(Action.PAUSE)
            self._moved()
        self._events.paused(self.id)

    async def resume(self) -> None:
        async with self._lock, self.checkpointing.exclusive():
            self.init.sm.check(Action.RESUME)
            await self.runc.resume(self.id)
            self.init.sm.advance(Action.RESUME)
            self._moved()
        self._events.resumed(self.id)

    async def update(self, resources: dict[str, Any]) -> None:
        async with self._lock:
            self.init.sm.check(Action.UPDATE)
            await self.runc.update(self.id, resources)

    async def checkpoint(self, cfg: CheckpointConfig) -> None:
        async with self._lock:
            self.init.sm.check(Action.CHECKPOINT)
            os.makedirs(cfg.path, mode=0o700, exist_ok=True)
            await self.checkpointing.checkpoint(cfg)
        self._events.checkpointed(self.id, cfg.path)

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
            pids = await self.runc.ps(self.id)
        except RuntimeCommandError:
            return [(self.init.pid, "")] if not self.init.exited else []
        by_pid = {p.pid: p.exec_id for p in self.execs.values() if p.pid}
        return [(pid, by_pid.get(pid, "")) for pid in pids]

    async def stats(self) -> dict[str, Any]:
        self.init.sm.check(Action.STATS)
        return await self.runc.stats(self.id)

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
            await BEHAVIOUR[self.init.state](self).delete()
            self.init.sm.advance(Action.DELETE)
            self.checkpointing.closed()
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
