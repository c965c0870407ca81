"""The shim binary driven over ttrpc as containerd would, with real runc underneath."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import threading
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from hotrestart.api.containerd.task.v2 import shim_pb2 as task
from hotrestart.api.containerd.v1.types import task_pb2 as types
from hotrestart.api.io.containerd.cgroups.v1 import metrics_pb2
from hotrestart.api.io.containerd.cgroups.v2 import metrics_pb2 as metrics_v2_pb2
from hotrestart.errors import Code
from hotrestart.runtime import cgroups
from hotrestart.ttrpc.client import StatusError

from .conftest import make_bundle, process_alive, start_shim, wait_gone

pytestmark = pytest.mark.integration


class FifoReader:
    """containerd's end of an output FIFO: reads until the shim closes it."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path = path
        self.data = b""
        self.done = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        with open(self.path, "rb") as f:
            self.data = f.read()
        self.done.set()

    def text(self, timeout: float = 10) -> str:
        assert self.done.wait(timeout), f"{self.path} never reached end of file"
        return self.data.decode()


async def expect_code(coro: object, code: Code) -> StatusError:
    with pytest.raises(StatusError) as info:
        await coro  # type: ignore[misc]
    assert info.value.code == code, info.value
    return info.value


async def test_lifecycle_output_exit_and_event_order(shim_env: tuple[Path, object, dict[str, str]]) -> None:
    tmp, sink, env = shim_env
    bundle = make_bundle(tmp, "c1", ["/bin/sh", "-c", "echo out; echo err >&2; exit 3"])
    shim = await start_shim(tmp, bundle, "c1", env)
    out, err = FifoReader(tmp / "out"), FifoReader(tmp / "err")
    created = await shim.call(
        "Create",
        task.CreateTaskRequest(id="c1", bundle=str(bundle), stdout=str(out.path), stderr=str(err.path)),
        task.CreateTaskResponse,
    )
    assert created.pid > 0
    state = await shim.call("State", task.StateRequest(id="c1"), task.StateResponse)
    assert state.status == types.CREATED
    waiter = asyncio.ensure_future(shim.call("Wait", task.WaitRequest(id="c1"), task.WaitResponse))
    started = await shim.call("Start", task.StartRequest(id="c1"), task.StartResponse)
    assert started.pid == created.pid
    waited = await asyncio.wait_for(waiter, 20)
    assert waited.exit_status == 3
    assert out.text() == "out\n" and err.text() == "err\n"
    state = await shim.call("State", task.StateRequest(id="c1"), task.StateResponse)
    assert (state.status, state.exit_status) == (types.STOPPED, 3)
    await expect_code(shim.call("Start", task.StartRequest(id="c1")), Code.FAILED_PRECONDITION)
    await expect_code(shim.call("Kill", task.KillRequest(id="c1", signal=9, all=True)), Code.NOT_FOUND)
    deleted = await shim.call("Delete", task.DeleteRequest(id="c1"), task.DeleteResponse)
    assert (deleted.pid, deleted.exit_status) == (created.pid, 3)
    await expect_code(shim.call("State", task.StateRequest(id="c1")), Code.NOT_FOUND)
    await sink.wait_for("/tasks/delete")
    assert sink.topics("c1") == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]
    await shim.call("Shutdown", task.ShutdownRequest(id="c1"))
    assert await wait_gone(shim.pid), "the shim must exit once its last container is deleted"
    assert not os.path.exists((bundle / "address").read_text().removeprefix("unix://"))


async def test_running_container_calls(shim_env: tuple[Path, object, dict[str, str]]) -> None:
    tmp, sink, env = shim_env
    script = "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done"
    bundle = make_bundle(tmp, "c2", ["/bin/sh", "-c", script])
    shim = await start_shim(tmp, bundle, "c2", env)
    await shim.call("Create", task.CreateTaskRequest(id="c2", bundle=str(bundle)))
    await shim.call("Start", task.StartRequest(id="c2"))
    await expect_code(shim.call("Start", task.StartRequest(id="c2")), Code.FAILED_PRECONDITION)
    await expect_code(shim.call("State", task.StateRequest(id="nope")), Code.NOT_FOUND)

    # exec with captured output
    out = FifoReader(tmp / "exec-out")
    spec = {
        "args": ["/bin/sh", "-c", "cat /tmp/count; exit 5"],
        "cwd": "/",
        "env": ["PATH=/bin"],
        "user": {"uid": 0, "gid": 0},
    }
    await shim.call(
        "Exec",
        task.ExecProcessRequest(
            id="c2",
            exec_id="e1",
            stdout=str(out.path),
            spec=any_pb2.Any(
                type_url="types.containerd.io/opencontainers/runtime-spec/1/Process", value=json.dumps(spec).encode()
            ),
        ),
    )
    await expect_code(
        shim.call(
            "Exec", task.ExecProcessRequest(id="c2", exec_id="e1", spec=any_pb2.Any(value=json.dumps(spec).encode()))
        ),
        Code.ALREADY_EXISTS,
    )
    await shim.call("Start", task.StartRequest(id="c2", exec_id="e1"))
    waited = await shim.call("Wait", task.WaitRequest(id="c2", exec_id="e1"), task.WaitResponse)
    assert waited.exit_status == 5
    assert int(out.text().strip()) > 0
    await shim.call("Delete", task.DeleteRequest(id="c2", exec_id="e1"))

    pids = await shim.call("Pids", task.PidsRequest(id="c2"), task.PidsResponse)
    assert len(pids.processes) >= 1
    assert min(_usage(await shim.call("Stats", task.StatsRequest(id="c2"), task.StatsResponse))) > 0

    await shim.call(
        "Update",
        task.UpdateTaskRequest(
            id="c2", resources=any_pb2.Any(value=json.dumps({"memory": {"limit": 64 << 20}}).encode())
        ),
    )
    assert _limit(await shim.call("Stats", task.StatsRequest(id="c2"), task.StatsResponse)) == 64 << 20
    await expect_code(
        shim.call("Update", task.UpdateTaskRequest(id="c2", resources=any_pb2.Any(value=b"{bad"))),
        Code.INVALID_ARGUMENT,
    )

    await shim.call("Pause", task.PauseRequest(id="c2"))
    await expect_code(shim.call("Pause", task.PauseRequest(id="c2")), Code.FAILED_PRECONDITION)
    assert (await shim.call("State", task.StateRequest(id="c2"), task.StateResponse)).status == types.PAUSED
    await shim.call("Resume", task.ResumeRequest(id="c2"))

    images = tmp / "images"
    await shim.call("Checkpoint", task.CheckpointTaskRequest(id="c2", path=str(images)), timeout=60)
    assert (images / "inventory.img").exists()
    assert (await shim.call("State", task.StateRequest(id="c2"), task.StateResponse)).status == types.RUNNING

    await shim.call("Kill", task.KillRequest(id="c2", signal=9))
    waited = await shim.call("Wait", task.WaitRequest(id="c2"), task.WaitResponse)
    assert waited.exit_status == 137
    await shim.call("Delete", task.DeleteRequest(id="c2"))
    await sink.wait_for("/tasks/delete")
    topics = sink.topics("c2")
    assert topics == [
        "/tasks/create",
        "/tasks/start",
        "/tasks/exec-added",
        "/tasks/exec-started",
        "/tasks/exit",
        "/tasks/paused",
        "/tasks/resumed",
        "/tasks/checkpointed",
        "/tasks/exit",
        "/tasks/delete",
    ]
    await shim.call("Shutdown", task.ShutdownRequest(id="c2"))
    assert await wait_gone(shim.pid)


async def test_oom_is_reported_before_exit(shim_env: tuple[Path, object, dict[str, str]]) -> None:
    tmp, sink, env = shim_env
    bundle = make_bundle(
        tmp, "c3", ["/bin/dd", "if=/dev/zero", "of=/dev/null", "bs=256M", "count=1"], memory_limit=32 << 20
    )
    shim = await start_shim(tmp, bundle, "c3", env)
    await shim.call("Create", task.CreateTaskRequest(id="c3", bundle=str(bundle)))
    await shim.call("Start", task.StartRequest(id="c3"))
    waited = await shim.call("Wait", task.WaitRequest(id="c3"), task.WaitResponse)
    assert waited.exit_status == 137
    await sink.wait_for("/tasks/exit")
    topics = sink.topics("c3")
    assert "/tasks/oom" in topics and topics.index("/tasks/oom") < topics.index("/tasks/exit")
    await shim.call("Delete", task.DeleteRequest(id="c3"))
    await shim.call("Shutdown", task.ShutdownRequest(id="c3"))
    assert await wait_gone(shim.pid)


async def test_restore_into_new_container_from_checkpoint(shim_env: tuple[Path, object, dict[str, str]]) -> None:
    tmp, _sink, env = shim_env
    # Restoring given images is off unless allowed, and then only images the shim attested
    # with the store key at their checkpoint.
    key = tmp / "store-key"
    key.write_text(f"k1:{base64.b64encode(os.urandom(32)).decode()}\n")
    key.chmod(0o600)
    from hotrestart.api.runtimeoptions.v1 import api_pb2 as runtimeoptions_pb2

    body = f'AllowArchiveRestore = true\nStoreKeyFile = "{key}"\n'.encode()
    options = any_pb2.Any(
        type_url="runtimeoptions.v1.Options",
        value=runtimeoptions_pb2.Options(config_body=body).SerializeToString(),
    )
    script = "i=0; while true; do i=$((i+1)); echo $i; sleep 0.05; done"
    bundle = make_bundle(tmp, "c4", ["/bin/sh", "-c", script])
    shim = await start_shim(tmp, bundle, "c4", env)
    out = FifoReader(tmp / "c4-out")
    await shim.call(
        "Create", task.CreateTaskRequest(id="c4", bundle=str(bundle), stdout=str(out.path), options=options)
    )
    await shim.call("Start", task.StartRequest(id="c4"))
    await asyncio.sleep(0.6)
    images = tmp / "c4-images"
    from hotrestart.api.containerd.runc.v1 import oci_pb2

    opts = oci_pb2.CheckpointOptions(exit=True)
    await shim.call(
        "Checkpoint",
        task.CheckpointTaskRequest(
            id="c4",
            path=str(images),
            options=any_pb2.Any(type_url="containerd.runc.v1.CheckpointOptions", value=opts.SerializeToString()),
        ),
        timeout=60,
    )
    await shim.call("Wait", task.WaitRequest(id="c4"), task.WaitResponse)
    before = [int(x) for x in out.text().split()]
    await shim.call("Delete", task.DeleteRequest(id="c4"))

    bundle2 = make_bundle(tmp, "c5", ["/bin/sh", "-c", "echo cold start"])
    out2 = FifoReader(tmp / "c5-out")
    assert (images / "hotrestart-attestation.json").exists()
    await shim.call(
        "Create",
        task.CreateTaskRequest(
            id="c5", bundle=str(bundle2), stdout=str(out2.path), checkpoint=str(images), options=options
        ),
    )
    assert (await shim.call("State", task.StateRequest(id="c5"), task.StateResponse)).status == types.CREATED
    started = await shim.call("Start", task.StartRequest(id="c5"), task.StartResponse, timeout=60)
    assert process_alive(started.pid)
    await asyncio.sleep(0.5)
    await shim.call("Kill", task.KillRequest(id="c5", signal=9))
    await shim.call("Wait", task.WaitRequest(id="c5"), task.WaitResponse)
    after = [int(x) for x in out2.text().split()]
    assert after and after[0] == before[-1] + 1, (before[-3:], after[:3])
    await shim.call("Delete", task.DeleteRequest(id="c5"))
    await shim.call("Shutdown", task.ShutdownRequest(id="c5"))
    assert await wait_gone(shim.pid)


async def test_shims_fork_from_one_zygote(shim_env: tuple[Path, object, dict[str, str]]) -> None:
    tmp, _sink, env = shim_env
    first = make_bundle(tmp, "z1", ["/bin/sh", "-c", "exit 0"])
    shim1 = await start_shim(tmp, first, "z1", env)
    zygote_sock = tmp / "zygote.sock"
    assert zygote_sock.exists(), "the first start launches the node's zygote"
    assert oct(zygote_sock.stat().st_mode & 0o777) == "0o600"
    second = make_bundle(tmp, "z2", ["/bin/sh", "-c", "echo forked; exit 4"])
    shim2 = await start_shim(tmp, second, "z2", env)
    assert shim2.pid != shim1.pid
    for shim in (shim1, shim2):
        cmdline = Path(f"/proc/{shim.pid}/cmdline").read_bytes()
        assert b"hotrestart.zygote" in cmdline, "shims are forked from the zygote"
    # A second start for the same pod reuses its shim.
    again = await start_shim(tmp, second, "z2", env)
    assert again.pid == shim2.pid
    out = FifoReader(tmp / "z2-out")
    await shim2.call("Create", task.CreateTaskRequest(id="z2", bundle=str(second), stdout=str(out.path)))
    await shim2.call("Start", task.StartRequest(id="z2"))
    assert (await shim2.call("Wait", task.WaitRequest(id="z2"), task.WaitResponse)).exit_status == 4
    assert out.text() == "forked\n"
    await shim2.call("Delete", task.DeleteRequest(id="z2"))
    for shim in (shim1, shim2):
        await shim.call("Shutdown", task.ShutdownRequest(id=""))
        assert await wait_gone(shim.pid)


async def test_without_zygote_each_shim_is_a_fresh_interpreter(
    shim_env: tuple[Path, object, dict[str, str]],
) -> None:
    tmp, _sink, env = shim_env
    env = dict(env, HOTRESTART_ZYGOTE="0")
    bundle = make_bundle(tmp, "f1", ["/bin/sh", "-c", "exit 0"])
    shim = await start_shim(tmp, bundle, "f1", env)
    assert not (tmp / "zygote.sock").exists()
    assert b"hotrestart.shim_main" in Path(f"/proc/{shim.pid}/cmdline").read_bytes()
    await shim.call("Create", task.CreateTaskRequest(id="f1", bundle=str(bundle)))
    await shim.call("Start", task.StartRequest(id="f1"))
    assert (await shim.call("Wait", task.WaitRequest(id="f1"), task.WaitResponse)).exit_status == 0
    await shim.call("Delete", task.DeleteRequest(id="f1"))
    await shim.call("Shutdown", task.ShutdownRequest(id=""))
    assert await wait_gone(shim.pid)


async def test_zygote_warm_up_runs_the_shim_machinery_cleanly() -> None:
    """The zygote's warm-up swallows errors (it is only an optimisation), so check here that
    it really gets through: an API change that broke it would otherwise go unnoticed."""
    import tempfile

    from hotrestart import zygote

    before = set(os.listdir(tempfile.gettempdir()))
    await zygote._exercise()
    assert set(os.listdir(tempfile.gettempdir())) <= before, "the warm-up leaves no temporary files"


def _v2(stats: task.StatsResponse) -> metrics_v2_pb2.Metrics:
    # As containerd's runc shim: v2 Metrics on a node with the unified hierarchy only.
    assert stats.stats.type_url == "io.containerd.cgroups.v2.Metrics"
    return metrics_v2_pb2.Metrics.FromString(stats.stats.value)


def _v1(stats: task.StatsResponse) -> metrics_pb2.Metrics:
    assert stats.stats.type_url == "io.containerd.cgroups.v1.Metrics"
    return metrics_pb2.Metrics.FromString(stats.stats.value)


def _usage(stats: task.StatsResponse) -> tuple[int, int]:
    """(memory in use, CPU time used), each in the unit its Metrics has."""
    if cgroups.unified_host():
        m2 = _v2(stats)
        assert m2.memory.anon > 0 and m2.memory_events.oom_kill == 0
        return m2.memory.usage, m2.cpu.usage_usec
    m1 = _v1(stats)
    return m1.memory.usage.usage, m1.cpu.usage.total


def _limit(stats: task.StatsResponse) -> int:
    return _v2(stats).memory.usage_limit if cgroups.unified_host() else _v1(stats).memory.usage.limit
