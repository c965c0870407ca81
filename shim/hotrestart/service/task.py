"""Task service adapter (containerd.task.v2.Task, also served as v3).

Each method decodes its request into plain values, calls the container and encodes the
reply. No method holds container logic, and no error is turned into a status here: the
ttrpc server maps every exception through `errors.status_for`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Callable
from typing import Any

from google.protobuf import any_pb2, empty_pb2
from google.protobuf.message import DecodeError

from hotrestart import __version__
from hotrestart import bundle as node_bundle
from hotrestart.api.containerd.runc.v1 import oci_pb2
from hotrestart.api.containerd.task.v2 import shim_pb2 as task
from hotrestart.api.containerd.v1.types import task_pb2 as types
from hotrestart.checkpoint.attested import ArchivePolicy
from hotrestart.checkpoint.engine import Engine
from hotrestart.checkpoint.hot import PodLabels, checkpointing_for
from hotrestart.container.config import CreateConfig, ExecConfig
from hotrestart.container.container import Container
from hotrestart.container.process import StdioPaths
from hotrestart.container.seam import CheckpointConfig
from hotrestart.container.state import State
from hotrestart.errors import AlreadyExistsError, InvalidArgumentError, NotFoundError
from hotrestart.events import TaskEvents, pack
from hotrestart.gpu.state import GpuState
from hotrestart.handoff import OPTIONS_FILE
from hotrestart.options import RuntimeOptions, decode
from hotrestart.reaper import Reaper
from hotrestart.runtime import mounts
from hotrestart.runtime.command import CommandRunner
from hotrestart.runtime.runc import Runc
from hotrestart.runtime.stats import metrics
from hotrestart.store.config import StoreSource, key_ring
from hotrestart.store.seal import SealError
from hotrestart.store.store import DEFAULT_ROOT as DEFAULT_STORE
from hotrestart.ttrpc.server import CallContext, Handler, unary

log = logging.getLogger(__name__)

SERVICES = ("containerd.task.v2.Task", "containerd.task.v3.Task")
STORE_ENV = "HOTRESTART_STORE"
CHECKPOINT_OPTIONS = "containerd.runc.v1.CheckpointOptions"

_STATUS = {
    State.CREATED: types.CREATED,
    State.CREATED_CHECKPOINT: types.CREATED,
    State.CREATED_RESTORE: types.CREATED,
    State.RUNNING: types.RUNNING,
    State.PAUSED: types.PAUSED,
    State.STOPPED: types.STOPPED,
    State.DELETED: types.STOPPED,
}


class TaskService:
    def __init__(
        self,
        *,
        namespace: str,
        reaper: Reaper,
        events: TaskEvents,
        on_idle: Callable[[], None] | None = None,
        defaults: RuntimeOptions | None = None,
        pod_labels: PodLabels | None = None,
    ) -> None:
        self.namespace = namespace
        self._reaper = reaper
        self._runner = CommandRunner(reaper)
        self._events = events
        self._on_idle = on_idle
        self._defaults = defaults or RuntimeOptions()
        self._pod_labels = pod_labels  # a pod's labels by sandbox id, from containerd
        self.containers: dict[str, Container] = {}
        self._engines: dict[str, Engine] = {}
        self._gpu: GpuState | None = None

    def handlers(self) -> dict[str, Handler]:
        return {
            "State": unary(task.StateRequest, self.State),
            "Create": unary(task.CreateTaskRequest, self.Create),
            "Start": unary(task.StartRequest, self.Start),
            "Delete": unary(task.DeleteRequest, self.Delete),
            "Pids": unary(task.PidsRequest, self.Pids),
            "Pause": unary(task.PauseRequest, self.Pause),
            "Resume": unary(task.ResumeRequest, self.Resume),
            "Checkpoint": unary(task.CheckpointTaskRequest, self.Checkpoint),
            "Kill": unary(task.KillRequest, self.Kill),
            "Exec": unary(task.ExecProcessRequest, self.Exec),
            "ResizePty": unary(task.ResizePtyRequest, self.ResizePty),
            "CloseIO": unary(task.CloseIORequest, self.CloseIO),
            "Update": unary(task.UpdateTaskRequest, self.Update),
            "Wait": unary(task.WaitRequest, self.Wait),
            "Stats": unary(task.StatsRequest, self.Stats),
            "Connect": unary(task.ConnectRequest, self.Connect),
            "Shutdown": unary(task.ShutdownRequest, self.Shutdown),
        }

    def _engine(self, opts: RuntimeOptions) -> Engine | None:
        """The hot-restart engine of the configured store; None (hot restart off: pods start
        cold and stops deliver their signal) when the store cannot be used safely."""
        root = opts.checkpoint_store or os.environ.get(STORE_ENV) or DEFAULT_STORE
        engine = self._engines.get(root)
        if engine is None:
            source = StoreSource(root, opts.store_key_file, opts.allow_unauthenticated_checkpoints, opts.s3_config_file)
            try:
                store = source.open()
            except (SealError, OSError, ValueError) as exc:
                log.error("hot restart is off for store %s: %s", root, exc)
                return None
            engine = self._engines[root] = Engine(self._runner, store, gpu=self._gpu_state(opts), source=source)
        return engine

    def _gpu_state(self, opts: RuntimeOptions) -> GpuState:
        if self._gpu is None:
            self._gpu = GpuState(self._runner, criu_binary=opts.criu_path or node_bundle.tool("criu") or "criu")
        return self._gpu

    async def drain(self) -> None:
        """Let checkpoints still being published finish before the shim exits."""
        for engine in self._engines.values():
            await engine.drain()

    def _get(self, cid: str) -> Container:
        container = self.containers.get(cid)
        if container is None:
            raise NotFoundError(f"container {cid}: container not created")
        return container

    def _runc_for(self, opts: RuntimeOptions, bundle: str) -> Runc:
        return Runc(
            self._runner,
            binary=opts.binary_name,
            root=os.path.join(opts.root, self.namespace),
            log_path=os.path.join(bundle, "log.json"),
            systemd_cgroup=opts.systemd_cgroup,
            criu=opts.criu_path,
        )

    # -- calls ----------------------------------------------------------------------------------

    async def Create(self, r: task.CreateTaskRequest, ctx: CallContext) -> task.CreateTaskResponse:
        if not r.id or "/" in r.id or r.id in (".", ".."):
            raise InvalidArgumentError(f"invalid container id {r.id!r}")
        if r.id in self.containers:
            raise AlreadyExistsError(f"container {r.id}: already exists")
        opts = decode(r.options) if r.HasField("options") else self._defaults
        bundle = r.bundle or os.getcwd()
        cfg = CreateConfig(
            id=r.id,
            bundle=bundle,
            rootfs=tuple(mounts.Mount(m.type, m.source, tuple(m.options)) for m in r.rootfs),
            stdio=StdioPaths(r.stdin, r.stdout, r.stderr, r.terminal),
            checkpoint=r.checkpoint,
            no_pivot=opts.no_pivot_root,
            no_new_keyring=opts.no_new_keyring,
        )
        _save_options(bundle, opts)
        gpu = self._gpu_state(opts)
        container = Container(
            cfg,
            self._runc_for(opts, bundle),
            self._reaper,
            self._events,
            lambda view: checkpointing_for(
                view, gpu, lambda: self._engine(opts), self._pod_labels, _archive_policy(opts)
            ),
        )
        self.containers[r.id] = container
        try:
            pid = await container.create()
        except BaseException:
            self.containers.pop(r.id, None)
            raise
        return task.CreateTaskResponse(pid=pid)

    async def Start(self, r: task.StartRequest, ctx: CallContext) -> task.StartResponse:
        return task.StartResponse(pid=await self._get(r.id).start(r.exec_id))

    async def Delete(self, r: task.DeleteRequest, ctx: CallContext) -> task.DeleteResponse:
        container = self._get(r.id)
        info = await container.delete(r.exec_id)
        if not r.exec_id:
            self.containers.pop(r.id, None)
        reply = task.DeleteResponse(pid=info.pid, exit_status=info.status)
        if info.exited_at_ns:
            reply.exited_at.FromNanoseconds(info.exited_at_ns)
        return reply

    async def Pids(self, r: task.PidsRequest, ctx: CallContext) -> task.PidsResponse:
        reply = task.PidsResponse()
        for pid, exec_id in await self._get(r.id).pids():
            info = reply.processes.add(pid=pid)
            if exec_id:
                info.info.CopyFrom(pack(oci_pb2.ProcessDetails(exec_id=exec_id)))
        return reply

    async def Pause(self, r: task.PauseRequest, ctx: CallContext) -> empty_pb2.Empty:
        await self._get(r.id).pause()
        return empty_pb2.Empty()

    async def Resume(self, r: task.ResumeRequest, ctx: CallContext) -> empty_pb2.Empty:
        await self._get(r.id).resume()
        return empty_pb2.Empty()

    async def Checkpoint(self, r: task.CheckpointTaskRequest, ctx: CallContext) -> empty_pb2.Empty:
        if not r.path:
            raise InvalidArgumentError("checkpoint path is required")
        cfg = CheckpointConfig(path=r.path)
        if r.HasField("options") and r.options.type_url:
            cfg = _checkpoint_config(r.path, r.options)
        await self._get(r.id).checkpoint(cfg)
        return empty_pb2.Empty()

    async def Kill(self, r: task.KillRequest, ctx: CallContext) -> empty_pb2.Empty:
        if r.signal <= 0 or r.signal > 64:
            raise InvalidArgumentError(f"invalid signal {r.signal}")
        await self._get(r.id).kill(r.exec_id, r.signal, r.all)
        return empty_pb2.Empty()

    async def Exec(self, r: task.ExecProcessRequest, ctx: CallContext) -> empty_pb2.Empty:
        try:
            spec = json.loads(r.spec.value) if r.spec.value else {}
        except ValueError as exc:
            raise InvalidArgumentError(f"exec {r.exec_id}: process spec is not JSON: {exc}") from exc
        if not isinstance(spec, dict) or not spec.get("args"):
            raise InvalidArgumentError(f"exec {r.exec_id}: process spec has no args")
        spec["terminal"] = r.terminal
        await self._get(r.id).exec(ExecConfig(r.exec_id, StdioPaths(r.stdin, r.stdout, r.stderr, r.terminal), spec))
        return empty_pb2.Empty()

    async def ResizePty(self, r: task.ResizePtyRequest, ctx: CallContext) -> empty_pb2.Empty:
        self._get(r.id).resize_pty(r.exec_id, r.width, r.height)
        return empty_pb2.Empty()

    async def CloseIO(self, r: task.CloseIORequest, ctx: CallContext) -> empty_pb2.Empty:
        if r.stdin:
            self._get(r.id).close_io(r.exec_id)
        return empty_pb2.Empty()

    async def Update(self, r: task.UpdateTaskRequest, ctx: CallContext) -> empty_pb2.Empty:
        try:
            resources = json.loads(r.resources.value) if r.resources.value else {}
        except ValueError as exc:
            raise InvalidArgumentError(f"update: resources are not JSON: {exc}") from exc
        if not isinstance(resources, dict):
            raise InvalidArgumentError("update: resources must be a JSON object")
        await self._get(r.id).update(resources)
        return empty_pb2.Empty()

    async def Wait(self, r: task.WaitRequest, ctx: CallContext) -> task.WaitResponse:
        info = await self._get(r.id).wait(r.exec_id)
        reply = task.WaitResponse(exit_status=info.status)
        reply.exited_at.FromNanoseconds(info.exited_at_ns)
        return reply

    async def Stats(self, r: task.StatsRequest, ctx: CallContext) -> task.StatsResponse:
        ctr = self._get(r.id)
        data = await ctr.stats()
        return task.StatsResponse(stats=pack(metrics(data, ctr.state("").pid)))

    async def State(self, r: task.StateRequest, ctx: CallContext) -> task.StateResponse:
        s = self._get(r.id).state(r.exec_id)
        reply = task.StateResponse(
            id=s.exec_id or s.id,
            bundle=s.bundle,
            pid=s.pid,
            status=_STATUS[s.state],
            stdin=s.stdio.stdin,
            stdout=s.stdio.stdout,
            stderr=s.stdio.stderr,
            terminal=s.stdio.terminal,
            exit_status=s.exit_status,
            exec_id=s.exec_id,
        )
        if s.exited_at_ns:
            reply.exited_at.FromNanoseconds(s.exited_at_ns)
        return reply

    async def Connect(self, r: task.ConnectRequest, ctx: CallContext) -> task.ConnectResponse:
        container = self.containers.get(r.id)
        return task.ConnectResponse(
            shim_pid=os.getpid(), task_pid=container.init.pid if container else 0, version=__version__
        )

    async def Shutdown(self, r: task.ShutdownRequest, ctx: CallContext) -> empty_pb2.Empty:
        log.info("shutdown requested (%d containers left)", len(self.containers))
        if not self.containers and self._on_idle is not None:
            # Reply first, then exit: containerd waits for the answer.
            asyncio.get_running_loop().call_soon(self._on_idle)
        return empty_pb2.Empty()


def _checkpoint_config(path: str, options: any_pb2.Any) -> CheckpointConfig:
    name = options.type_url.rsplit("/", 1)[-1]
    if name != CHECKPOINT_OPTIONS:
        raise InvalidArgumentError(f"unsupported checkpoint options type {name}")
    try:
        o = oci_pb2.CheckpointOptions.FromString(options.value)
    except DecodeError as exc:
        raise InvalidArgumentError(f"malformed checkpoint options: {exc}") from exc
    kwargs: dict[str, Any] = dict(
        path=path,
        exit=o.exit,
        open_tcp=o.open_tcp,
        external_unix_sockets=o.external_unix_sockets,
        terminal=o.terminal,
        file_locks=o.file_locks,
        empty_namespaces=tuple(o.empty_namespaces),
        cgroups_mode=o.cgroups_mode,
        work_path=o.work_path,
        options_given=True,
    )
    return CheckpointConfig(**kwargs)


def _archive_policy(opts: RuntimeOptions) -> ArchivePolicy:
    return ArchivePolicy(
        allow=opts.allow_archive_restore,
        allow_unauthenticated=opts.allow_unauthenticated_archives,
        keys=lambda: key_ring(opts.store_key_file),
    )


def _save_options(bundle: str, opts: RuntimeOptions) -> None:
    """Kept in the bundle so `delete` can find runc after this shim is gone."""
    with contextlib.suppress(OSError):
        with open(os.path.join(bundle, OPTIONS_FILE), "w") as f:
            json.dump({"binary_name": opts.binary_name, "root": opts.root}, f)
