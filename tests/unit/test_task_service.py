"""TaskService, called as the ttrpc server calls it: real protobuf requests, the fake runc below.

The bundles carry no Kubernetes annotations, so hot restart is off for every container here
(checkpoint/policy.py enables it only for `io.kubernetes.cri.container-type: container`);
the checkpoint store the service opens anyway is a temporary folder."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fakes import (
    EventRecorder,
    FakeRunc,
    FifoReader,
    eventually,
    freezing_would_stop_us,
    make_bundle,
    process_alive,
)
from google.protobuf import any_pb2

from hotrestart.api.containerd.runc.v1 import oci_pb2
from hotrestart.api.containerd.task.v2 import shim_pb2 as task
from hotrestart.api.containerd.v1.types import task_pb2 as types
from hotrestart.api.runtimeoptions.v1 import api_pb2 as runtimeoptions_pb2
from hotrestart.errors import AlreadyExistsError, InvalidArgumentError, NotFoundError, RuntimeCommandError
from hotrestart.events import TaskEvents
from hotrestart.options import RuntimeOptions
from hotrestart.reaper import Reaper
from hotrestart.service.task import TaskService
from hotrestart.ttrpc.server import CallContext

NAMESPACE = "unit"
CTX = CallContext("containerd.task.v2.Task", "test", {"containerd-namespace-ttrpc": (NAMESPACE,)})
SIGTERM_EXIT = 128 + signal.SIGTERM


class Setup:
    def __init__(self, service: TaskService, fake: FakeRunc, bundles: Path, store: Path) -> None:
        self.service = service
        self.fake = fake
        self.bundles = bundles
        self.store = store

    @property
    def runc_root(self) -> Path:
        return self.fake.root / NAMESPACE

    def bundle(self, cid: str, args: list[str] | None = None) -> Path:
        return make_bundle(self.bundles, cid, args or ["sleep", "60"])

    async def create(self, cid: str, args: list[str] | None = None, **fields: object) -> int:
        bundle = self.bundle(cid, args)
        reply = await self.service.Create(task.CreateTaskRequest(id=cid, bundle=str(bundle), **fields), CTX)  # type: ignore[arg-type]
        return int(reply.pid)

    async def state(self, cid: str, exec_id: str = "") -> task.StateResponse:
        return await self.service.State(task.StateRequest(id=cid, exec_id=exec_id), CTX)

    async def end(self, cid: str) -> None:
        """Kill (if need be) and delete a container a test is done with."""
        if (await self.state(cid)).status != types.STOPPED:
            await self.service.Kill(task.KillRequest(id=cid, signal=signal.SIGKILL, all=True), CTX)
            await asyncio.wait_for(self.service.Wait(task.WaitRequest(id=cid), CTX), 5)
        await self.service.Delete(task.DeleteRequest(id=cid), CTX)


@pytest.fixture
async def setup(fake_runc: FakeRunc, reaper: Reaper, task_events: TaskEvents, tmp_path: Path) -> AsyncIterator[Setup]:
    store = tmp_path / "store"
    defaults = RuntimeOptions(binary_name=str(fake_runc.binary), root=str(fake_runc.root), checkpoint_store=str(store))
    service = TaskService(namespace=NAMESPACE, reaper=reaper, events=task_events, defaults=defaults)
    yield Setup(service, fake_runc, tmp_path / "bundles", store)
    await service.drain()


async def test_create_start_kill_wait_delete(setup: Setup, recorder: EventRecorder, tmp_path: Path) -> None:
    out = FifoReader(tmp_path / "stdout")
    args = ["/bin/sh", "-c", "echo started; exec sleep 60"]
    pid = await setup.create("c1", args, stdout=str(out.path))
    assert pid > 0
    state = await setup.state("c1")
    assert (state.id, state.pid, state.status, state.stdout) == ("c1", pid, types.CREATED, str(out.path))
    assert state.bundle == str(setup.bundles / "c1")

    waiting = asyncio.ensure_future(setup.service.Wait(task.WaitRequest(id="c1"), CTX))
    started = await setup.service.Start(task.StartRequest(id="c1"), CTX)
    assert started.pid == pid
    assert (await setup.state("c1")).status == types.RUNNING
    await eventually(lambda: out.read_now() == b"started\n", what="the output")
    assert not waiting.done()

    await setup.service.Kill(task.KillRequest(id="c1", signal=signal.SIGTERM), CTX)
    waited = await asyncio.wait_for(waiting, 5)
    assert waited.exit_status == SIGTERM_EXIT and waited.exited_at.ToNanoseconds() > 0
    state = await setup.state("c1")
    assert (state.status, state.exit_status) == (types.STOPPED, SIGTERM_EXIT)
    assert state.exited_at == waited.exited_at

    deleted = await setup.service.Delete(task.DeleteRequest(id="c1"), CTX)
    assert (deleted.pid, deleted.exit_status, deleted.exited_at) == (pid, SIGTERM_EXIT, waited.exited_at)
    with pytest.raises(NotFoundError):
        await setup.state("c1")
    assert recorder.topics("c1") == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]
    # Hot restart is off: the stop delivered the signal, nothing was checkpointed.
    assert setup.fake.verbs() == ["create", "start", "kill", "delete"]
    create = setup.fake.calls()[0]
    assert create[:6] == [
        "--root",
        str(setup.runc_root),
        "--log",
        str(setup.bundles / "c1" / "log.json"),
        "--log-format",
        "json",
    ]
    assert not setup.fake.exists("c1", setup.runc_root)


@pytest.mark.parametrize("cid", ["", "a/b", ".", ".."])
async def test_create_refuses_invalid_ids(setup: Setup, cid: str) -> None:
    bundle = setup.bundle("valid")
    with pytest.raises(InvalidArgumentError, match="invalid container id"):
        await setup.service.Create(task.CreateTaskRequest(id=cid, bundle=str(bundle)), CTX)
    assert setup.fake.calls() == []


async def test_create_refuses_a_duplicate_id(setup: Setup) -> None:
    pid = await setup.create("c1")
    other = setup.bundles / "other"
    other.mkdir()
    with pytest.raises(AlreadyExistsError):
        await setup.service.Create(task.CreateTaskRequest(id="c1", bundle=str(other)), CTX)
    assert setup.fake.verbs() == ["create"]
    state = await setup.state("c1")
    assert (state.pid, state.status) == (pid, types.CREATED)
    await setup.end("c1")


async def test_unknown_ids_are_not_found(setup: Setup) -> None:
    calls = [
        setup.service.State(task.StateRequest(id="nope"), CTX),
        setup.service.Start(task.StartRequest(id="nope"), CTX),
        setup.service.Kill(task.KillRequest(id="nope", signal=signal.SIGTERM), CTX),
        setup.service.Wait(task.WaitRequest(id="nope"), CTX),
        setup.service.Delete(task.DeleteRequest(id="nope"), CTX),
        setup.service.Pids(task.PidsRequest(id="nope"), CTX),
        setup.service.Pause(task.PauseRequest(id="nope"), CTX),
    ]
    for call in calls:
        with pytest.raises(NotFoundError, match="container not created"):
            await call
    assert setup.fake.calls() == []


async def test_unknown_exec_id_is_not_found(setup: Setup) -> None:
    await setup.create("c1")
    with pytest.raises(NotFoundError):
        await setup.state("c1", "nope")
    await setup.end("c1")


async def test_failed_create_leaves_no_container(setup: Setup, recorder: EventRecorder) -> None:
    setup.fake.fail("create", "unable to apply cgroup configuration")
    with pytest.raises(RuntimeCommandError, match="unable to apply cgroup configuration"):
        await setup.create("c1")
    with pytest.raises(NotFoundError):
        await setup.state("c1")
    assert recorder.events == []
    # The id is free again.
    setup.fake.clear("create")
    bundle = setup.bundles / "c1"
    await setup.service.Create(task.CreateTaskRequest(id="c1", bundle=str(bundle)), CTX)
    await setup.end("c1")


async def test_kill_refuses_invalid_signals(setup: Setup) -> None:
    await setup.create("c1")
    for sig in (0, 65):
        with pytest.raises(InvalidArgumentError, match="invalid signal"):
            await setup.service.Kill(task.KillRequest(id="c1", signal=sig), CTX)
    assert "kill" not in setup.fake.verbs()
    await setup.end("c1")


async def test_exec_and_pids(setup: Setup) -> None:
    pid = await setup.create("c1")
    await setup.service.Start(task.StartRequest(id="c1"), CTX)
    spec = any_pb2.Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/Process")
    spec.value = json.dumps({"args": ["sleep", "60"], "cwd": "/"}).encode()
    await setup.service.Exec(task.ExecProcessRequest(id="c1", exec_id="e1", spec=spec), CTX)
    exec_pid = (await setup.service.Start(task.StartRequest(id="c1", exec_id="e1"), CTX)).pid
    exec_state = await setup.state("c1", "e1")
    assert (exec_state.id, exec_state.exec_id, exec_state.pid, exec_state.status) == (
        "e1",
        "e1",
        exec_pid,
        types.RUNNING,
    )

    reply = await setup.service.Pids(task.PidsRequest(id="c1"), CTX)
    found = {}
    for p in reply.processes:
        details = oci_pb2.ProcessDetails()
        if p.HasField("info"):
            assert p.info.type_url == "containerd.runc.v1.ProcessDetails"
            details.ParseFromString(p.info.value)
        found[p.pid] = details.exec_id
    assert found == {pid: "", exec_pid: "e1"}

    empty = any_pb2.Any(value=json.dumps({"cwd": "/"}).encode())
    with pytest.raises(InvalidArgumentError, match="no args"):
        await setup.service.Exec(task.ExecProcessRequest(id="c1", exec_id="e2", spec=empty), CTX)
    await setup.end("c1")


async def test_connect(setup: Setup) -> None:
    pid = await setup.create("c1")
    reply = await setup.service.Connect(task.ConnectRequest(id="c1"), CTX)
    assert (reply.shim_pid, reply.task_pid) == (os.getpid(), pid)
    assert reply.version
    assert (await setup.service.Connect(task.ConnectRequest(id="nope"), CTX)).task_pid == 0
    await setup.end("c1")


async def test_runtime_options_from_the_request(setup: Setup, tmp_path: Path) -> None:
    """runtimeoptions.v1.Options (what containerd sends a runtime not named runc) choose runc and its root."""
    root = tmp_path / "runc-root" / "from-options"
    body = f'BinaryName = "{setup.fake.binary}"\nRoot = "{root}"\nCheckpointStore = "{setup.store}"\n'
    options = any_pb2.Any(type_url="runtimeoptions.v1.Options")
    options.value = runtimeoptions_pb2.Options(config_body=body.encode()).SerializeToString()
    bundle = setup.bundle("c1")
    await setup.service.Create(task.CreateTaskRequest(id="c1", bundle=str(bundle), options=options), CTX)
    assert setup.fake.exists("c1", root / NAMESPACE)
    assert setup.fake.calls()[0][:2] == ["--root", str(root / NAMESPACE)]
    await setup.end("c1")
    assert not setup.fake.exists("c1", root / NAMESPACE)


@pytest.mark.skipif(freezing_would_stop_us(), reason="the shim would freeze this test's own cgroup")
async def test_checkpoint_of_a_plain_container(setup: Setup, recorder: EventRecorder, tmp_path: Path) -> None:
    pid = await setup.create("c1")
    await setup.service.Start(task.StartRequest(id="c1"), CTX)
    images = tmp_path / "images"
    await setup.service.Checkpoint(task.CheckpointTaskRequest(id="c1", path=str(images)), CTX)
    assert (images / "inventory.img").exists()
    assert "--leave-running" in setup.fake.calls()[-1]
    assert process_alive(pid) and (await setup.state("c1")).status == types.RUNNING
    assert recorder.of("/tasks/checkpointed")[0].checkpoint == str(images)

    setup.fake.fail("checkpoint", "criu failed: type DUMP errno 0")
    with pytest.raises(RuntimeCommandError, match="criu failed"):
        await setup.service.Checkpoint(task.CheckpointTaskRequest(id="c1", path=str(tmp_path / "again")), CTX)
    assert len(recorder.of("/tasks/checkpointed")) == 1
    assert (await setup.state("c1")).status == types.RUNNING
    with pytest.raises(InvalidArgumentError, match="path is required"):
        await setup.service.Checkpoint(task.CheckpointTaskRequest(id="c1"), CTX)
    await setup.end("c1")
