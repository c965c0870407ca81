"""A Container with hot restart, through its public methods, over the fake runc: what a
stop, a failed dump, a SIGKILL during a dump and a failed restore look like to containerd."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fakes import EventRecorder, FakeRunc, FifoReader, eventually, make_bundle
from test_hot_component import FakeClock, StandInRunner

from hotrestart.checkpoint import dump, workarea
from hotrestart.checkpoint.engine import Engine
from hotrestart.checkpoint.hot import HotRestart
from hotrestart.checkpoint.policy import policy_for
from hotrestart.checkpoint.restore import RestoreFailed
from hotrestart.container.config import CreateConfig
from hotrestart.container.container import Container
from hotrestart.container.process import StdioPaths
from hotrestart.container.seam import View
from hotrestart.container.state import State
from hotrestart.events import TaskEvents
from hotrestart.reaper import Reaper
from hotrestart.runtime import cgroups
from hotrestart.runtime.runc import Runc
from hotrestart.store.manifest import Identity
from hotrestart.store.store import Store

IDENT = Identity("team-a", "web-0", "app")
POD = {
    "io.kubernetes.cri.container-type": "container",
    "io.kubernetes.cri.sandbox-namespace": IDENT.namespace,
    "io.kubernetes.cri.sandbox-name": IDENT.pod,
    "io.kubernetes.cri.container-name": IDENT.container,
}

NewContainer = Callable[..., Container]


class GpuStateLost(HotRestart):
    """A restore that runc completes and the GPU step then fails (as a lost device would)."""

    async def finish_restore(self) -> None:
        await super().finish_restore()
        raise RestoreFailed("GPU state could not be restored")


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(str(tmp_path / "store"))


@pytest.fixture
def new_container(
    runc: Runc, reaper: Reaper, task_events: TaskEvents, tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> NewContainer:
    # The fake's processes share the test's cgroup: the freezer is left alone.
    monkeypatch.setattr(cgroups, "freeze_quiescent", lambda pid, *_: True)
    monkeypatch.setattr(cgroups, "thaw", lambda pid, *_: None)
    monkeypatch.setattr(cgroups, "procs", lambda pid: [pid])
    monkeypatch.setattr(dump, "memory_usage", lambda pid: 1 << 20)
    engine = Engine(StandInRunner(), store, work=workarea.Places.under(str(tmp_path / "work")), node="n1")  # type: ignore[arg-type]
    clock = FakeClock()

    def make(cid: str, *, stdout: str = "", kind: type[HotRestart] = HotRestart) -> Container:
        bundle = make_bundle(tmp_path / "bundles", cid, ["sleep", "60"], annotations=POD)
        spec = json.loads((bundle / "config.json").read_text())
        spec["process"]["cwd"] = "/"  # the same workload each time (the bundle path is not part of it)
        (bundle / "config.json").write_text(json.dumps(spec))
        cfg = CreateConfig(id=cid, bundle=str(bundle), rootfs=(), stdio=StdioPaths(stdout=stdout))

        def hot(view: View) -> HotRestart:
            return kind(view, engine, policy_for(view.spec), clock=clock)

        return Container(cfg, runc, reaper, task_events, hot)

    return make


async def _running(new_container: NewContainer, cid: str, **kwargs: Any) -> Container:
    container = new_container(cid, **kwargs)
    await container.create()
    await container.start()
    return container


async def _stopped_with_checkpoint(new_container: NewContainer, store: Store) -> None:
    first = await _running(new_container, "first")
    await first.kill("", signal.SIGTERM, False)
    assert (await asyncio.wait_for(first.wait(""), 10)).status == 128 + signal.SIGTERM
    await first.delete()
    await eventually(lambda: store.latest(IDENT) is not None, 10, "the stop's checkpoint published")


async def test_a_stop_is_checkpointed_and_reported_as_the_signal(
    new_container: NewContainer, fake_runc: FakeRunc, store: Store, recorder: EventRecorder
) -> None:
    container = await _running(new_container, "c1")
    await container.kill("", signal.SIGTERM, False)
    info = await asyncio.wait_for(container.wait(""), 10)
    assert info.status == 128 + signal.SIGTERM, "exit as the signal would have produced"
    assert "checkpoint" in fake_runc.verbs() and "kill" not in fake_runc.verbs(), "dumped, never signalled"
    [exit_event] = recorder.of("/tasks/exit")
    assert exit_event.exit_status == 128 + signal.SIGTERM
    await container.delete()
    await eventually(lambda: store.latest(IDENT) is not None, 10, "published")
    entry = store.latest(IDENT)
    assert entry is not None and entry.manifest is not None and entry.manifest.reason == "stop"


async def test_a_failed_dump_delivers_the_signal(
    new_container: NewContainer, fake_runc: FakeRunc, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    container = await _running(new_container, "c1")
    fake_runc.fail("checkpoint", "criu: cannot seize 4242")
    with caplog.at_level(logging.INFO):
        await container.kill("", signal.SIGTERM, False)
        info = await asyncio.wait_for(container.wait(""), 10)
    assert info.status == 128 + signal.SIGTERM
    assert fake_runc.verbs()[-2:] == ["checkpoint", "kill"], "the signal went out after the dump failed"
    assert "cannot seize 4242" in caplog.text and "delivering signal 15 the ordinary way" in caplog.text
    await container.delete()
    assert list(store.entries()) == [] and not store.is_pending(IDENT)


async def test_sigkill_cancels_a_dump_in_progress(
    new_container: NewContainer, fake_runc: FakeRunc, store: Store
) -> None:
    container = await _running(new_container, "c1")
    fake_runc.delay("checkpoint", 30)
    await container.kill("", signal.SIGTERM, False)
    await eventually(lambda: store.is_pending(IDENT), 5, "the dump under way")
    await container.kill("", signal.SIGKILL, True)
    info = await asyncio.wait_for(container.wait(""), 5)
    assert info.status == 128 + signal.SIGKILL
    await container.delete()
    assert list(store.entries()) == [] and not store.is_pending(IDENT), "nothing restorable left"


async def test_a_failed_restore_starts_cold_in_the_same_call(
    new_container: NewContainer, fake_runc: FakeRunc, store: Store, tmp_path: Path
) -> None:
    await _stopped_with_checkpoint(new_container, store)
    fake_runc.fail("restore", "criu: restore failed")
    out = FifoReader(tmp_path / "out")
    again = new_container("again", stdout=str(out.path))
    await again.create()
    assert again.state("").state is State.CREATED_RESTORE
    pid = await again.start()
    assert pid and again.state("").state is State.RUNNING, "the pod always starts"
    verbs = fake_runc.verbs()
    assert verbs[verbs.index("restore") :][:4] == ["restore", "delete", "create", "start"]
    assert [e.state for e in store.entries()] == ["quarantine"]
    await again.kill("", signal.SIGKILL, True)
    await asyncio.wait_for(again.wait(""), 5)
    await again.delete()
    text = await out.text()
    first, second = text.splitlines()[:2]
    assert first.startswith("hotrestart: restoring from checkpoint ")
    assert second.startswith("hotrestart: restore from checkpoint ") and second.endswith("; started cold")
    assert "criu: restore failed" in second


async def test_a_restore_failing_after_runc_gets_fresh_stdio_and_a_cold_start(
    new_container: NewContainer, fake_runc: FakeRunc, store: Store, recorder: EventRecorder, tmp_path: Path
) -> None:
    await _stopped_with_checkpoint(new_container, store)
    out = FifoReader(tmp_path / "out")
    again = new_container("again", stdout=str(out.path), kind=GpuStateLost)
    await again.create()
    pid = await again.start()
    restored = fake_runc.state("again") if fake_runc.exists("again") else {}
    assert "restored_from" not in restored, "the container running now was created, not restored"
    assert pid and again.state("").state is State.RUNNING
    assert [e.state for e in store.entries()] == ["quarantine"]
    await asyncio.sleep(0.2)
    exits = [e.container_id for e in recorder.of("/tasks/exit")]
    assert "again" not in exits, "the restored process's death is not this container's exit"
    await again.kill("", signal.SIGKILL, True)
    await asyncio.wait_for(again.wait(""), 5)
    await again.delete()
    text = await out.text()
    assert "GPU state could not be restored" in text and "started cold" in text
