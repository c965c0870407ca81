"""The hot-restart component on its own: a real directory store, fakes at our own seams (a
Runc stand-in, the freezer, a clock), no root and no waiting out windows or intervals."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from storekit import IDENT, make_checkpoint

from hotrestart.checkpoint import dump, restore, workarea
from hotrestart.checkpoint.engine import Engine
from hotrestart.checkpoint.hot import HotRestart
from hotrestart.checkpoint.policy import Policy
from hotrestart.container.seam import CheckpointConfig, View
from hotrestart.errors import RuntimeCommandError, ShimError
from hotrestart.runtime import cgroups
from hotrestart.runtime.command import Completed
from hotrestart.runtime.runc import CheckpointOpts
from hotrestart.store.manifest import Identity
from hotrestart.store.store import Store


class FakeClock:
    """Time that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._due: list[tuple[float, Callable[[], None], list[bool]]] = []
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def monotonic(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[[], None]) -> Any:
        cancelled = [False]
        self._due.append((self.now + delay, callback, cancelled))

        class Handle:
            def cancel(self) -> None:
                cancelled[0] = True

        return Handle()

    async def sleep(self, seconds: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.now + seconds, fut))
        await fut

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for entry in [d for d in self._due if d[0] <= self.now]:
            self._due.remove(entry)
            if not entry[2][0]:
                entry[1]()
        for sleeper in [s for s in self._sleepers if s[0] <= self.now]:
            self._sleepers.remove(sleeper)
            if not sleeper[1].done():
                sleeper[1].set_result(None)


class StandInRunc:
    """The runc calls checkpointing makes, answered in process."""

    criu = ""

    def __init__(self) -> None:
        self.dumps = 0
        self.fail = ""
        self.hold: asyncio.Event | None = None  # a dump waits for this when set

    async def version(self) -> str:
        return "1.2.0"

    async def checkpoint(self, cid: str, opts: CheckpointOpts, *, timeout: float | None = None) -> None:
        self.dumps += 1
        if self.hold is not None:
            await self.hold.wait()
        if self.fail:
            raise RuntimeCommandError(["runc"], 1, self.fail, "checkpoint")
        os.makedirs(opts.image_path, exist_ok=True)
        for name, size in (("inventory.img", 64), ("pages-1.img", 1 << 16)):
            Path(opts.image_path, name).write_bytes(os.urandom(size))

    async def ps(self, cid: str) -> list[int]:
        return []


class StandInRunner:
    async def run(self, argv: list[str], **_: Any) -> Completed:
        if "check" in argv:  # no userfaultfd here: restores are full ones
            return Completed(argv, 1, b"", b"")
        return Completed(argv, 0, b"Version: 4.2\n", b"")


@pytest.fixture
def freezer(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The cgroup freezer, recorded instead of used (the test's own cgroup must never freeze)."""
    calls: list[str] = []

    def freeze(pid: int, *_: Any) -> bool:
        calls.append("freeze")
        return True

    monkeypatch.setattr(cgroups, "freeze_quiescent", freeze)
    monkeypatch.setattr(cgroups, "thaw", lambda pid, *_: calls.append("thaw"))
    monkeypatch.setattr(cgroups, "procs", lambda pid: [pid])
    monkeypatch.setattr(dump, "memory_usage", lambda pid: 1 << 20)
    return calls


def _hot(tmp_path: Path, *, interval: float = 0.0) -> tuple[HotRestart, StandInRunc, FakeClock, Store]:
    store = Store(str(tmp_path / "store"))
    engine = Engine(StandInRunner(), store, work=workarea.Places.under(str(tmp_path / "work")), node="n1")  # type: ignore[arg-type]
    runc = StandInRunc()
    view = View("c1", str(tmp_path), {}, runc, (), False, pid=os.getpid(), running=True)  # type: ignore[arg-type]
    clock = FakeClock()
    hot = HotRestart(view, engine, Policy(True, IDENT, timeout=30.0, interval=interval), clock=clock)
    return hot, runc, clock, store


async def _until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def _states(store: Store) -> list[str]:
    return sorted(e.state for e in store.entries())


async def test_a_stop_is_dumped_and_published(tmp_path: Path, freezer: list[str]) -> None:
    hot, _, _, store = _hot(tmp_path)
    assert await hot.checkpoint_for_stop(15) is True
    await hot.engine.drain()
    [entry] = store.published(IDENT)
    assert entry.manifest is not None and entry.manifest.reason == "stop"
    assert freezer[0] == "freeze" and freezer[-1] == "thaw"
    assert not store.is_pending(IDENT)
    assert os.listdir(tmp_path / "work") == []


async def test_a_failed_dump_leaves_nothing_and_asks_for_the_signal(
    tmp_path: Path, freezer: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    hot, runc, _, store = _hot(tmp_path)
    runc.fail = "criu: cannot seize"
    with caplog.at_level(logging.WARNING):
        assert await hot.checkpoint_for_stop(15) is False
    assert "checkpoint on stop failed" in caplog.text and "cannot seize" in caplog.text
    assert list(store.entries()) == [] and not store.is_pending(IDENT)
    assert freezer[-1] == "thaw", "the signal must find the container thawed"
    assert os.listdir(tmp_path / "work") == []


async def test_a_dump_cancelled_part_way_leaves_nothing(tmp_path: Path, freezer: list[str]) -> None:
    hot, runc, _, store = _hot(tmp_path)
    runc.hold = asyncio.Event()
    stopping = asyncio.ensure_future(hot.checkpoint_for_stop(15))
    await _until(lambda: runc.dumps == 1)
    assert store.is_pending(IDENT)
    stopping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    assert list(store.entries()) == [] and not store.is_pending(IDENT)
    assert freezer.count("thaw") >= 1 and freezer[-1] == "thaw"
    assert os.listdir(tmp_path / "work") == []


def _held_publishes(store: Store) -> tuple[threading.Event, threading.Event]:
    """Hold every publish of `store` until the first event is set; the second is set once
    one has begun."""
    gate, inside = threading.Event(), threading.Event()
    publish = store.publish

    def held_publish(*args: Any, **kwargs: Any) -> Any:
        inside.set()
        gate.wait(10)
        return publish(*args, **kwargs)

    store.publish = held_publish  # type: ignore[method-assign]
    return gate, inside


async def test_a_periodic_tick_is_skipped_while_the_last_one_is_published(tmp_path: Path, freezer: list[str]) -> None:
    hot, runc, clock, store = _hot(tmp_path, interval=60.0)
    gate, _ = _held_publishes(store)
    hot.started()
    try:
        await asyncio.sleep(0)
        clock.advance(60)
        await _until(lambda: hot.engine.publisher.publishing(IDENT, "periodic"))
        clock.advance(60)  # the first is still being published: no second dump
        await asyncio.sleep(0.05)
        assert runc.dumps == 1
        gate.set()
        await _until(lambda: not hot.engine.publisher.publishing(IDENT, "periodic"))
        clock.advance(60)
        await _until(lambda: runc.dumps == 2)
    finally:
        gate.set()
        hot.closed()
        await hot.engine.drain()
    assert [e.manifest.reason for e in store.published(IDENT) if e.manifest] == ["periodic"]


async def _restored(tmp_path: Path) -> tuple[HotRestart, FakeClock, Store]:
    hot, _, clock, store = _hot(tmp_path)
    make_checkpoint(store, tmp_path)
    entry = store.latest(IDENT)
    assert entry is not None
    hot._planned = entry  # what plan_restore finds when runtime and spec match
    images = await hot.prepare_restore()
    assert os.path.isdir(images.image_path) and "restoring from checkpoint" in images.note
    await hot.finish_restore()
    assert _states(store) == ["claimed"]
    return hot, clock, store


async def test_a_restore_that_dies_inside_the_window_gives_its_checkpoint_back(tmp_path: Path) -> None:
    hot, clock, store = await _restored(tmp_path)
    clock.advance(restore.RESTORE_WINDOW - 5)
    hot.exited(137, stop_requested=False)
    assert _states(store) == ["checkpoints"]
    [entry] = store.published(IDENT)
    assert entry.manifest is not None and entry.manifest.restore_attempts == 1


async def test_a_restore_that_outlives_the_window_uses_its_checkpoint_up(tmp_path: Path) -> None:
    hot, clock, store = await _restored(tmp_path)
    clock.advance(restore.RESTORE_WINDOW + 1)
    assert _states(store) == []
    hot.exited(137, stop_requested=False)
    assert _states(store) == []


@pytest.mark.parametrize("then", ["returns", "raises"])
async def test_a_death_while_the_restore_is_finished_is_an_early_death(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, then: str
) -> None:
    hot, _, clock, store = _hot(tmp_path)
    make_checkpoint(store, tmp_path)
    hot._planned = store.latest(IDENT)
    await hot.prepare_restore()
    finish, handed_back = restore.finish, asyncio.Event()

    async def finish_after_the_device_state(*args: Any) -> None:
        await handed_back.wait()  # as a GPU process's device state is given back
        if then == "raises":
            raise RuntimeError("cuda-checkpoint: no such process")
        await finish(*args)

    monkeypatch.setattr(restore, "finish", finish_after_the_device_state)
    finishing = asyncio.ensure_future(hot.finish_restore())
    await asyncio.sleep(0)
    clock.advance(restore.RESTORE_WINDOW + 10)  # a hand-back longer than the window
    hot.exited(139, stop_requested=False)  # the exit is reported while start still runs
    handed_back.set()
    if then == "raises":
        with pytest.raises(RuntimeError):
            await finishing
        hot.abandon_restore(RuntimeError("cuda-checkpoint: no such process"))  # as the container does
    else:
        await finishing
    assert _states(store) == ["checkpoints"], "given back for another try, not used up"
    [entry] = store.published(IDENT)
    assert entry.manifest is not None and entry.manifest.restore_attempts == 1
    assert os.listdir(tmp_path / "work") == []


async def test_a_stop_inside_the_window_is_not_a_failed_restore(tmp_path: Path) -> None:
    hot, clock, store = await _restored(tmp_path)
    clock.advance(1)
    hot.exited(143, stop_requested=True)
    assert _states(store) == [], "asked to stop: the checkpoint served its purpose"


async def test_a_failed_restore_is_quarantined_with_its_reason(tmp_path: Path) -> None:
    hot, _, _, store = _hot(tmp_path)
    make_checkpoint(store, tmp_path)
    hot._planned = store.latest(IDENT)
    await hot.prepare_restore()
    note = hot.abandon_restore(RuntimeError("criu: restore failed"))
    assert "failed (criu: restore failed); started cold" in note
    assert _states(store) == ["quarantine"]
    assert os.listdir(tmp_path / "work") == []


async def test_an_api_checkpoint_is_handed_over_and_kept_until_a_clean_exit(tmp_path: Path, freezer: list[str]) -> None:
    hot, _, _, store = _hot(tmp_path)
    await hot.checkpoint(CheckpointConfig(path=str(tmp_path / "for-containerd")))
    await hot.engine.drain()
    assert sorted(os.listdir(tmp_path / "for-containerd")) == ["inventory.img", "pages-1.img"]
    newest = store.latest(IDENT)
    assert newest is not None and newest.manifest is not None and newest.manifest.reason == "api"
    hot.exited(0, stop_requested=False)  # done on its own: nothing left to recover
    assert _states(store) == []


async def test_a_clean_exit_during_a_publish_leaves_no_restore_point(tmp_path: Path, freezer: list[str]) -> None:
    hot, runc, clock, store = _hot(tmp_path, interval=60.0)
    gate, inside = _held_publishes(store)
    hot.started()
    try:
        await asyncio.sleep(0)
        clock.advance(60)
        await _until(inside.is_set)  # past the check that drops a superseded publish
        hot.exited(0, stop_requested=False)
        gate.set()
        await hot.engine.drain()
    finally:
        gate.set()
        hot.closed()
        await hot.engine.drain()
    assert runc.dumps == 1
    assert _states(store) == [], "the job is done: the publish under way when it ended is no restore point"


def _replica(
    tmp_path: Path, engine: Engine, pod: str, labels: dict[str, str] | Exception
) -> tuple[HotRestart, StandInRunc]:
    """A replica of one Deployment: its own pod name, its pod's labels from containerd."""
    spec = {"annotations": {"io.kubernetes.cri.sandbox-id": f"sandbox-{pod}"}, "process": {"args": ["serve"]}}
    runc = StandInRunc()
    view = View(f"c-{pod}", str(tmp_path), spec, runc, (), False, pid=os.getpid(), running=True)  # type: ignore[arg-type]

    async def pod_labels(sandbox: str) -> dict[str, str]:
        assert sandbox == f"sandbox-{pod}"
        if isinstance(labels, Exception):
            raise labels
        return labels

    policy = Policy(True, Identity("shop", pod, "app"), timeout=30.0)
    return HotRestart(view, engine, policy, clock=FakeClock(), pod_labels=pod_labels), runc


def _engine(tmp_path: Path) -> Engine:
    store = Store(str(tmp_path / "store"))
    return Engine(StandInRunner(), store, work=workarea.Places.under(str(tmp_path / "work")), node="n1")  # type: ignore[arg-type]


async def test_replicas_of_one_template_restore_one_checkpoint_each(tmp_path: Path, freezer: list[str]) -> None:
    engine = _engine(tmp_path)
    template = {"app": "web", "pod-template-hash": "7d4b9c8f6d"}
    for pod in ("web-7d4b9c8f6d-aaaaa", "web-7d4b9c8f6d-bbbbb"):
        old, _ = _replica(tmp_path, engine, pod, template)
        await old.plan_restore()
        assert await old.checkpoint_for_stop(15)
    await engine.drain()
    pool = old.policy.identity
    assert pool.pool and pool.key == "@template/7d4b9c8f6d/app"
    assert len(engine.store.candidates(pool)) == 2
    restored = []
    for pod in ("web-7d4b9c8f6d-ccccc", "web-7d4b9c8f6d-ddddd"):
        new, _ = _replica(tmp_path, engine, pod, template)
        assert (await new.plan_restore()).restore
        images = await new.prepare_restore()
        assert "pod template 7d4b9c8f6d" in images.note
        await new.finish_restore()
        assert new._claim is not None
        restored.append(new._claim.entry.id)
    assert len(set(restored)) == 2, "each replica got its own member"
    assert os.listdir(tmp_path / "work") == []
    third, _ = _replica(tmp_path, engine, "web-7d4b9c8f6d-eeeee", template)
    assert not (await third.plan_restore()).restore, "two members, two restores: the third starts cold"


async def test_a_member_claimed_elsewhere_first_gives_way_to_the_next(tmp_path: Path, freezer: list[str]) -> None:
    engine = _engine(tmp_path)
    template = {"pod-template-hash": "7d4b9c8f6d"}
    for pod in ("web-a", "web-b"):
        old, _ = _replica(tmp_path, engine, pod, template)
        await old.plan_restore()
        assert await old.checkpoint_for_stop(15)
    await engine.drain()
    new, _ = _replica(tmp_path, engine, "web-c", template)
    assert (await new.plan_restore()).restore
    newest = engine.store.candidates(new.policy.identity)[0]
    assert Store(str(tmp_path / "store")).claim(newest) is not None  # another node, a moment earlier
    await new.prepare_restore()
    assert new._claim is not None and new._claim.entry.id != newest.id
    await new.finish_restore()  # frees the work area
    assert os.listdir(tmp_path / "work") == []


async def test_without_the_pods_labels_the_pod_name_is_the_identity(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = _engine(tmp_path)
    hot, _ = _replica(tmp_path, engine, "web-a", ShimError("containerd: unavailable"))
    await hot.plan_restore()
    assert hot.policy.identity.source == "", "no workload checkpoints in the namespace: nothing asked at create"
    with caplog.at_level(logging.WARNING):
        await hot.identify()  # the first dump's
    got = hot.policy.identity
    assert got.canonical() == "shop/web-a/app" and not got.pool
    assert "pod labels unavailable" in got.source and "unavailable" in caplog.text


async def test_a_lazily_restored_container_is_dumped_only_once_its_memory_is_back(
    tmp_path: Path, freezer: list[str]
) -> None:
    """CRIU must not read a process whose pages are still arriving: a stop waits for them
    within its budget, and past it the signal is delivered."""
    hot, _, _ = await _restored(tmp_path)
    assert hot._claim is not None
    back = asyncio.Event()
    hot._claim.resident = asyncio.ensure_future(back.wait())
    hot.policy = dataclasses.replace(hot.policy, timeout=1.0)
    assert await hot.checkpoint_for_stop(15) is False, "the memory did not come back in time"
    hot._stopping = False
    hot.policy = dataclasses.replace(hot.policy, timeout=30.0)
    stop = asyncio.ensure_future(hot.checkpoint_for_stop(15))
    await asyncio.sleep(0.2)
    assert not stop.done()
    back.set()
    assert await stop is True
    await hot.engine.drain()


async def test_a_lazy_restore_uses_its_checkpoint_up_only_once_resident(tmp_path: Path) -> None:
    """Its chunks feed the process until then: consumed earlier, they could be collected."""
    hot, clock, store = await _restored(tmp_path)
    assert hot._claim is not None
    back = asyncio.Event()
    hot._claim.resident = asyncio.ensure_future(back.wait())
    clock.advance(restore.RESTORE_WINDOW + 1)
    assert _states(store) == ["claimed"]
    back.set()
    await _until(lambda: _states(store) == [])


async def test_a_restore_notes_itself_beside_its_checkpoint(tmp_path: Path) -> None:
    hot, _, store = await _restored(tmp_path)
    [entry] = [e for e in store.entries() if e.state == "claimed"]
    record = store.restore_record(entry)
    assert record is not None and not record.lazy and record.node == hot.engine.node
    assert record.resident_after is None and abs(record.started_at - time.time()) < 60
