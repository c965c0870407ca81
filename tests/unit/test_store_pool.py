"""A pool: one checkpoint per stopped replica of a pod template, each claimed once."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from storekit import make_checkpoint

from hotrestart.store import store as store_module
from hotrestart.store.manifest import Identity
from hotrestart.store.store import Store

POOL = Identity("shop", "web-7d4b9c8f6d-aaaaa", "app", key="@template/7d4b9c8f6d/app", pool=True)


def _member(pod: str) -> Identity:
    return Identity("shop", pod, "app", key=POOL.key, pool=True)


def test_each_stopped_replica_keeps_its_checkpoint(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    now = time.time()
    ids = [make_checkpoint(store, tmp_path, created=now - 10 + i, ident=_member(f"web-{i}")) for i in range(3)]
    # The slowest publish comes last, carrying the oldest state: still a member.
    late = make_checkpoint(store, tmp_path, created=now - 20, ident=_member("web-late"))
    assert sorted(e.id for e in store.candidates(POOL)) == sorted([*ids, late])
    assert [e.id for e in store.candidates(POOL)][:3] == ids[::-1], "newest first"


def test_each_member_is_claimed_exactly_once(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    for i in range(3):
        make_checkpoint(store, tmp_path, created=time.time() - i, ident=_member(f"web-{i}"))
    # Two nodes sharing the store: one rename wins each member.
    other_node = Store(str(tmp_path / "s"))
    claims = [s.claim(e) for e in store.candidates(POOL) for s in (store, other_node)]
    won = [c for c in claims if c is not None]
    assert len(won) == 3 and len({c.id for c in won}) == 3
    assert store.candidates(POOL) == []


def test_a_pool_is_capped_and_its_old_members_expire(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "POOL_CAP", 3)
    store = Store(str(tmp_path / "s"))
    now = time.time()
    stale = make_checkpoint(store, tmp_path, created=now - store_module.POOL_TTL - 60, ident=_member("old"))
    ids = [make_checkpoint(store, tmp_path, created=now - 10 + i, ident=_member(f"web-{i}")) for i in range(5)]
    kept = {e.id for e in store.candidates(POOL)}
    assert kept == set(ids[-3:]), "the newest three"
    assert stale not in kept


def test_one_container_still_keeps_only_its_newest(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    single = Identity("shop", "web-0", "app")
    make_checkpoint(store, tmp_path, created=time.time() - 5, ident=single)
    newest = make_checkpoint(store, tmp_path, created=time.time(), ident=single)
    assert [e.id for e in store.candidates(single)] == [newest]


def test_a_replicas_newer_checkpoint_replaces_its_own_older_one(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    now = time.time()
    other = make_checkpoint(store, tmp_path, created=now - 30, ident=_member("web-b"))
    ticks = [
        make_checkpoint(store, tmp_path, created=now - 20 + i, ident=_member("web-a"), reason="periodic")
        for i in range(5)
    ]
    assert {e.id for e in store.candidates(POOL)} == {other, ticks[-1]}, "one member per pod"
    late = make_checkpoint(store, tmp_path, created=now - 25, ident=_member("web-a"), reason="periodic")
    assert late not in {e.id for e in store.candidates(POOL)}, "an older one of the same pod is dropped"


def test_a_running_replicas_checkpoint_is_only_for_its_own_restart(tmp_path: Path) -> None:
    from hotrestart.checkpoint.policy import Policy
    from hotrestart.checkpoint.restore import _pool_pick

    store = Store(str(tmp_path / "s"))
    now = time.time()
    running = make_checkpoint(store, tmp_path, created=now, ident=_member("web-a"), reason="periodic")
    stopped = make_checkpoint(store, tmp_path, created=now - 60, ident=_member("web-b"))
    candidates = store.candidates(POOL)
    new_replica = _pool_pick(candidates, Policy(True, _member("web-c")))
    assert new_replica is not None and new_replica.id == stopped, "never a clone of a replica still running"
    restarted = _pool_pick(candidates, Policy(True, _member("web-a")))
    assert restarted is not None and restarted.id == running, "a restart in place takes its own"
