"""Warm scale-out's helpers: the template's identity, the marker looked for beneath the
container's root without following links, and waiting for warm."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from hotrestart.checkpoint import identity, template
from hotrestart.checkpoint.policy import Snapshot
from hotrestart.store.manifest import Identity

BASE = Identity("web", "web-7d4b9c8f6d-x2x9q", "app")


def test_a_template_identity_only_for_a_replicasets_pod() -> None:
    pool = identity.from_labels(BASE, {"pod-template-hash": "7d4b9c8f6d"})
    snap = identity.template_of(pool)
    assert snap is not None
    assert (snap.key, snap.pool, snap.namespace) == ("@snapshot/7d4b9c8f6d/app", False, "web")
    assert identity.template_of(identity.from_labels(BASE, {})) is None
    job = identity.from_labels(BASE, {"batch.kubernetes.io/job-name": "train", "controller-uid": "u1"})
    assert identity.template_of(job) is None


def test_the_marker_is_found_without_following_links(tmp_path: Path) -> None:
    pid = os.getpid()  # its root is "/": the test's paths are absolute
    warm = tmp_path / "app" / "warm"
    assert not template.marker_present(pid, str(warm))
    warm.parent.mkdir()
    warm.write_text("")
    assert template.marker_present(pid, str(warm))
    # A link on the way is never followed: the application cannot point the root shim elsewhere.
    os.symlink(tmp_path / "app", tmp_path / "link")
    assert not template.marker_present(pid, str(tmp_path / "link" / "warm"))
    assert not template.marker_present(pid, str(tmp_path / "app" / ".." / "app" / "warm"))
    assert not template.marker_present(999_999_999, str(warm))


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_warm_after_the_delay_or_the_marker_and_never_without_either(tmp_path: Path) -> None:
    clock = _Clock()
    assert asyncio.run(template.warm(os.getpid(), Snapshot(after=30.0), clock)) is True  # type: ignore[arg-type]
    assert clock.now >= 30.0
    marker = tmp_path / "warm"
    marker.write_text("")
    clock = _Clock()
    assert asyncio.run(template.warm(os.getpid(), Snapshot(marker=str(marker)), clock)) is True  # type: ignore[arg-type]
    assert clock.now == 0.0
    assert asyncio.run(template.warm(os.getpid(), Snapshot(), _Clock())) is False  # type: ignore[arg-type]
