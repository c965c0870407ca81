"""A plain (hot restart off) Container through its public methods, over the fake runc.

Processes are real; stdio goes through containerd-style FIFOs; events are recorded at the
shim's own seam (TaskEvents over an EventSink)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fakes import (
    TERM_WITH_OUTPUT,
    TERM_WITH_OUTPUT_BYTES,
    EventRecorder,
    FakeRunc,
    FifoReader,
    FifoWriter,
    eventually,
    make_bundle,
    process_alive,
)

from hotrestart.container.config import CreateConfig, ExecConfig
from hotrestart.container.container import Container
from hotrestart.container.process import StdioPaths
from hotrestart.container.state import State
from hotrestart.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    RuntimeCommandError,
)
from hotrestart.events import TaskEvents
from hotrestart.reaper import Reaper
from hotrestart.runtime.runc import Runc

SIGTERM_EXIT = 128 + signal.SIGTERM
SIGKILL_EXIT = 128 + signal.SIGKILL

NewContainer = Callable[..., Container]


@pytest.fixture
def new_container(runc: Runc, reaper: Reaper, task_events: TaskEvents, tmp_path: Path) -> NewContainer:
    """A Container for a fresh bundle running `args`, with stdio paths as given."""

    def make(cid: str, args: list[str], stdin: str = "", stdout: str = "", stderr: str = "") -> Container:
        bundle = make_bundle(tmp_path / "bundles", cid, args)
        cfg = CreateConfig(id=cid, bundle=str(bundle), rootfs=(), stdio=StdioPaths(stdin, stdout, stderr))
        return Container(cfg, runc, reaper, task_events)

    return make


async def running(new_container: NewContainer, cid: str = "c1", args: list[str] | None = None) -> Container:
    container = new_container(cid, args or ["sleep", "60"])
    await container.create()
    await container.start()
    return container


async def stop(container: Container) -> None:
    """End and delete a container a test is done with."""
    if container.state("").state is not State.STOPPED:
        await container.kill("", signal.SIGKILL, True)
        await asyncio.wait_for(container.wait(""), 5)
    await container.delete()


def open_fds() -> set[tuple[str, str]]:
    """Each open descriptor with what it points at, so a leak that reuses a number freed
    meanwhile by another test's finalizer still shows."""
    fds = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds.add((fd, os.readlink(f"/proc/self/fd/{fd}")))
        except FileNotFoundError:
            pass  # the listing's own descriptor, closed by now
    return fds


async def test_run_kill_and_exit_after_output(
    new_container: NewContainer, recorder: EventRecorder, fake_runc: FakeRunc, tmp_path: Path
) -> None:
    out = FifoReader(tmp_path / "stdout", slow=True)
    container = new_container("c1", TERM_WITH_OUTPUT, stdout=str(out.path))
    # What containerd could read when the exit went out: all output, and end of file.
    seen_at_exit: list[tuple[int, bool]] = []

    def at_exit(topic: str, event: Any) -> None:
        if topic == "/tasks/exit":
            seen_at_exit.append((len(out.read_now()), out.eof.is_set()))

    recorder.hooks.append(at_exit)

    pid = await container.create()
    assert pid > 0 and process_alive(pid)
    assert container.state("").state is State.CREATED
    assert await container.start() == pid
    assert container.state("").state is State.RUNNING
    await eventually(lambda: b"ready\n" in out.read_now(), what="ready")

    await container.kill("", signal.SIGTERM, False)
    info = await asyncio.wait_for(container.wait(""), 10)
    assert (info.pid, info.status) == (pid, SIGTERM_EXIT)
    assert info.exited_at_ns > 0
    assert seen_at_exit == [(len("ready\n") + TERM_WITH_OUTPUT_BYTES, True)]
    state = container.state("")
    assert (state.state, state.exit_status, state.pid) == (State.STOPPED, SIGTERM_EXIT, pid)

    deleted = await container.delete()
    assert (deleted.pid, deleted.status) == (pid, SIGTERM_EXIT)
    assert not fake_runc.exists("c1")
    assert recorder.topics("c1") == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]
    [create], [start], [exit_], [delete] = (
        recorder.of(t) for t in ("/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete")
    )
    assert (create.pid, start.pid, exit_.pid, delete.pid) == (pid, pid, pid, pid)
    assert (exit_.id, exit_.exit_status, delete.exit_status) == ("c1", SIGTERM_EXIT, SIGTERM_EXIT)
    assert create.bundle == container.bundle and create.io.stdout == str(out.path)


async def test_exit_status_and_both_output_streams(new_container: NewContainer, tmp_path: Path) -> None:
    out, err = FifoReader(tmp_path / "stdout"), FifoReader(tmp_path / "stderr")
    container = new_container(
        "c1", ["/bin/sh", "-c", "echo out; echo err >&2; exit 3"], stdout=str(out.path), stderr=str(err.path)
    )
    await container.create()
    await container.start()
    assert (await asyncio.wait_for(container.wait(""), 5)).status == 3
    assert await out.text() == "out\n" and await err.text() == "err\n"
    with pytest.raises(FailedPreconditionError, match="cannot start a container that is stopped"):
        await container.start()
    await container.delete()


async def test_exec_add_start_exit_delete(new_container: NewContainer, recorder: EventRecorder, tmp_path: Path) -> None:
    container = await running(new_container)
    out = FifoReader(tmp_path / "exec-out")
    spec = {"args": ["/bin/sh", "-c", "echo from-exec; exit 5"], "cwd": "/"}
    await container.exec(ExecConfig("e1", StdioPaths(stdout=str(out.path)), spec))
    assert container.state("e1").state is State.CREATED
    exec_pid = await container.start("e1")
    assert exec_pid not in (0, container.state("").pid)
    info = await asyncio.wait_for(container.wait("e1"), 5)
    assert (info.pid, info.status) == (exec_pid, 5)
    assert await out.text() == "from-exec\n"
    assert container.state("e1").state is State.STOPPED
    assert container.state("").state is State.RUNNING

    assert (await container.delete("e1")).status == 5
    with pytest.raises(NotFoundError):
        container.state("e1")
    exec_exit = recorder.of("/tasks/exit")[0]
    assert (exec_exit.id, exec_exit.pid, exec_exit.exit_status) == ("e1", exec_pid, 5)
    added, started = recorder.of("/tasks/exec-added")[0], recorder.of("/tasks/exec-started")[0]
    assert (added.exec_id, started.exec_id, started.pid) == ("e1", "e1", exec_pid)
    assert recorder.topics("c1") == [
        "/tasks/create",
        "/tasks/start",
        "/tasks/exec-added",
        "/tasks/exec-started",
        "/tasks/exit",
    ]
    await stop(container)


async def test_exec_stdin_and_close_io(new_container: NewContainer, tmp_path: Path) -> None:
    container = await running(new_container)
    stdin, out = FifoWriter(tmp_path / "exec-in"), FifoReader(tmp_path / "exec-out")
    try:
        await container.exec(ExecConfig("cat", StdioPaths(str(stdin.path), str(out.path)), {"args": ["cat"]}))
        await container.start("cat")
        stdin.write(b"hello\n")
        await eventually(lambda: out.read_now() == b"hello\n", what="the echo")
        # containerd still holds its end of the FIFO: only CloseIO can give cat end of file.
        container.close_io("cat")
        assert (await asyncio.wait_for(container.wait("cat"), 5)).status == 0
    finally:
        stdin.close()
    await stop(container)


async def test_exec_ids_checked(new_container: NewContainer, recorder: EventRecorder) -> None:
    container = await running(new_container)
    with pytest.raises(InvalidArgumentError, match="invalid exec id"):
        await container.exec(ExecConfig("../e1", StdioPaths(), {"args": ["true"]}))
    await container.exec(ExecConfig("e1", StdioPaths(), {"args": ["sleep", "60"]}))
    with pytest.raises(AlreadyExistsError):
        await container.exec(ExecConfig("e1", StdioPaths(), {"args": ["true"]}))
    with pytest.raises(NotFoundError):
        await container.start("e2")
    with pytest.raises(NotFoundError):
        await container.kill("e2", signal.SIGTERM, False)
    with pytest.raises(NotFoundError):
        await container.wait("e2")
    assert recorder.topics().count("/tasks/exec-added") == 1
    await stop(container)


async def test_exec_refused_in_a_created_container(new_container: NewContainer, fake_runc: FakeRunc) -> None:
    container = new_container("c1", ["sleep", "60"])
    await container.create()
    with pytest.raises(FailedPreconditionError, match="cannot exec a container that is created"):
        await container.exec(ExecConfig("e1", StdioPaths(), {"args": ["true"]}))
    assert "exec" not in fake_runc.verbs()
    await container.delete()


async def test_failing_exec_start_reports_runc_and_ends_the_exec(
    new_container: NewContainer, fake_runc: FakeRunc
) -> None:
    container = await running(new_container)
    await container.exec(ExecConfig("e1", StdioPaths(), {"args": ["true"]}))
    fake_runc.fail("exec", "exec failed: no such file")
    with pytest.raises(RuntimeCommandError, match=r"runc exec failed .*no such file"):
        await container.start("e1")
    assert container.state("e1").state is State.STOPPED
    await container.delete("e1")
    await stop(container)


async def test_pause_and_resume(new_container: NewContainer, recorder: EventRecorder) -> None:
    container = new_container("c1", ["sleep", "60"])
    await container.create()
    with pytest.raises(FailedPreconditionError, match="cannot pause a container that is created"):
        await container.pause()
    await container.start()
    await container.pause()
    assert container.state("").state is State.PAUSED
    with pytest.raises(FailedPreconditionError, match="cannot pause a container that is paused"):
        await container.pause()
    await container.resume()
    assert container.state("").state is State.RUNNING
    with pytest.raises(FailedPreconditionError, match="cannot resume a container that is running"):
        await container.resume()
    assert recorder.topics("c1") == ["/tasks/create", "/tasks/start", "/tasks/paused", "/tasks/resumed"]
    await stop(container)


async def test_delete_of_a_created_container_ends_its_init(
    new_container: NewContainer, fake_runc: FakeRunc, recorder: EventRecorder
) -> None:
    container = new_container("c1", ["sleep", "60"])
    pid = await container.create()
    info = await container.delete()
    assert (info.pid, info.status) == (pid, SIGKILL_EXIT)
    assert not process_alive(pid) and not fake_runc.exists("c1")
    assert fake_runc.calls()[-1][-3:] == ["delete", "--force", "c1"]
    assert recorder.topics("c1")[0] == "/tasks/create" and recorder.topics("c1")[-1] == "/tasks/delete"
    assert "/tasks/start" not in recorder.topics()
    with pytest.raises(NotFoundError):
        await container.start()


async def test_kill_after_exit_is_not_found(new_container: NewContainer) -> None:
    container = await running(new_container, args=["true"])
    await asyncio.wait_for(container.wait(""), 5)
    with pytest.raises(NotFoundError, match="already finished"):
        await container.kill("", signal.SIGTERM, False)
    await container.delete()


async def test_kill_racing_the_exit_is_not_found(new_container: NewContainer, fake_runc: FakeRunc) -> None:
    """The init can end between the state check and runc kill: runc's answer means the same."""
    container = await running(new_container)
    fake_runc.fail("kill", "container not running")
    with pytest.raises(NotFoundError, match="already finished"):
        await container.kill("", signal.SIGTERM, False)
    fake_runc.fail("kill", "unable to signal init: permission denied")
    with pytest.raises(RuntimeCommandError, match="permission denied"):
        await container.kill("", signal.SIGTERM, False)
    fake_runc.clear("kill")
    await stop(container)


async def test_kill_of_an_exited_exec_is_not_found(new_container: NewContainer) -> None:
    container = await running(new_container)
    await container.exec(ExecConfig("e1", StdioPaths(), {"args": ["true"]}))
    await container.start("e1")
    await asyncio.wait_for(container.wait("e1"), 5)
    with pytest.raises(NotFoundError, match="already finished"):
        await container.kill("e1", signal.SIGTERM, False)
    await stop(container)


async def test_init_exit_ends_running_execs_first(new_container: NewContainer, recorder: EventRecorder) -> None:
    container = await running(new_container)
    await container.exec(ExecConfig("e1", StdioPaths(), {"args": ["sleep", "60"]}))
    exec_pid = await container.start("e1")
    await container.kill("", signal.SIGTERM, False)
    assert (await asyncio.wait_for(container.wait(""), 10)).status == SIGTERM_EXIT
    assert not process_alive(exec_pid)
    exits = [(e.id, e.exit_status) for e in recorder.of("/tasks/exit")]
    assert exits == [("e1", SIGKILL_EXIT), ("c1", SIGTERM_EXIT)]
    await container.delete("e1")
    await container.delete()


async def test_failing_create_reports_runc_and_releases_stdio(
    new_container: NewContainer, fake_runc: FakeRunc, recorder: EventRecorder, tmp_path: Path
) -> None:
    fds = open_fds()
    out = FifoReader(tmp_path / "stdout")
    fake_runc.fail("create", "unable to start container process: permission denied", code=1)
    container = new_container("c1", ["sleep", "60"], stdout=str(out.path))
    with pytest.raises(RuntimeCommandError, match=r"runc create failed .*permission denied"):
        await container.create()
    assert await out.text(timeout=5) == ""  # the shim let go of containerd's FIFO
    out.close()
    assert open_fds() - fds == set()  # only leaks count: other tests' finalizers may close some
    assert not fake_runc.exists("c1")
    assert recorder.events == []


async def test_failing_start_reports_runc_and_keeps_the_container(
    new_container: NewContainer, fake_runc: FakeRunc, recorder: EventRecorder
) -> None:
    container = new_container("c1", ["sleep", "60"])
    pid = await container.create()
    fake_runc.fail("start", "cannot start: exec fifo gone", code=2)
    with pytest.raises(RuntimeCommandError, match=r"runc start failed \(exit 2\): cannot start: exec fifo gone"):
        await container.start()
    assert container.state("").state is State.CREATED
    assert "/tasks/start" not in recorder.topics()
    fake_runc.clear("start")
    assert await container.start() == pid
    await stop(container)


async def test_cancelled_start_leaves_the_container_created(new_container: NewContainer, fake_runc: FakeRunc) -> None:
    container = new_container("c1", ["sleep", "60"])
    await container.create()
    fake_runc.delay("start", 30)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.5):
            await container.start()
    assert container.state("").state is State.CREATED
    fake_runc.clear("start")
    await container.delete()


async def test_update_pids_and_stats(new_container: NewContainer, fake_runc: FakeRunc) -> None:
    container = await running(new_container)
    await container.update({"cpu": {"shares": 512}})
    assert fake_runc.state("c1")["resources"] == {"cpu": {"shares": 512}}
    await container.exec(ExecConfig("e1", StdioPaths(), {"args": ["sleep", "60"]}))
    exec_pid = await container.start("e1")
    assert sorted(await container.pids()) == sorted([(container.state("").pid, ""), (exec_pid, "e1")])
    stats = await container.stats()
    assert stats["pids"]["current"] == 2
    await stop(container)
    assert await container.pids() == []
