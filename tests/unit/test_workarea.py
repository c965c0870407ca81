"""Work folders: named after their shim, swept when that shim is gone; cancelled restores
give their checkpoint back."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest
from storekit import IDENT, make_checkpoint

from hotrestart.checkpoint import restore, workarea
from hotrestart.checkpoint.engine import Engine
from hotrestart.checkpoint.policy import Policy
from hotrestart.container.seam import View
from hotrestart.store.store import Store

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@needs_root
def test_sweep_unmounts_and_removes_only_the_dead_shims_folders(tmp_path: Path) -> None:
    root = tmp_path / "work"
    root.mkdir()
    dead = root / f"{_dead_pid()}-20261130T000000Z-abc"
    mine = root / f"{os.getpid()}-restore-x"
    legacy = root / "restore-20261130T000000Z-def"  # made before folders carried their pid
    for path in (dead, mine, legacy):
        path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "hotrestart-test", str(dead)], check=True)
    (dead / "pages-1.img").write_bytes(b"memory")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("x")
    link = root / "1-link"
    link.symlink_to(outside)
    try:
        removed = workarea.sweep(str(root))
    finally:
        subprocess.run(["umount", "-l", str(dead)], check=False, capture_output=True)
    assert sorted(removed) == sorted([dead.name, legacy.name, link.name])
    assert sorted(os.listdir(root)) == [mine.name]
    assert (outside / "keep").read_text() == "x"
    assert str(dead) not in Path("/proc/self/mounts").read_text()


@pytest.mark.parametrize("fails", [False, True])
async def test_a_cancelled_restore_releases_its_claim(tmp_path: Path, fails: bool) -> None:
    """After `prepare`, the container runs `runc restore`; a failure there quarantines the
    checkpoint, a cancellation gives it back; either way the work area goes."""
    store = Store(str(tmp_path / "store"))
    make_checkpoint(store, tmp_path)
    engine = Engine(None, store, work=workarea.Places.under(str(tmp_path / "work")))  # type: ignore[arg-type]
    entry = store.latest(IDENT)
    assert entry is not None
    view = View("c1", str(tmp_path), {}, None, (), False)  # type: ignore[arg-type]
    claim, images = await restore.prepare(engine, view, entry, Policy(True, IDENT, lazy=False))
    assert os.path.isdir(images.image_path)
    restore.abandon(engine, claim, RuntimeError("criu said no") if fails else asyncio.CancelledError())
    states = {e.state for e in store.entries()}
    assert states == ({"quarantine"} if fails else {"checkpoints"})
    assert os.listdir(tmp_path / "work") == []


def test_images_over_the_memory_budget_go_to_disk(tmp_path: Path) -> None:
    places = workarea.Places(str(tmp_path / "memory"), str(tmp_path / "disk"), memory_limit=64 << 20)
    path, tmpfs = workarea.make(places, "dump-1", 512 << 20)
    assert not tmpfs
    assert os.path.dirname(path) == str(tmp_path / "disk")
    assert os.stat(path).st_mode & 0o777 == 0o700
    assert not places.fits_in_memory(1 << 30)
    workarea.drop(path, tmpfs)
    assert os.listdir(tmp_path / "disk") == []


def test_work_settings_come_from_the_environment() -> None:
    places = workarea.Places.from_env({"HOTRESTART_WORK_DIR": "/srv/work/", "HOTRESTART_WORK_MEMORY": "2G"})
    assert (places.memory, places.disk, places.memory_limit) == (workarea.ROOT, "/srv/work", 2 << 30)
    assert workarea.Places.from_env({"HOTRESTART_WORK_MEMORY": "0"}).fits_in_memory(1) is False
    bad = workarea.Places.from_env({"HOTRESTART_WORK_DIR": "../x", "HOTRESTART_WORK_MEMORY": "lots"})
    assert (bad.disk, bad.memory_limit) == (workarea.DISK_ROOT, None)


@needs_root
def test_sweep_covers_the_disk_folder_too(tmp_path: Path) -> None:
    places = workarea.Places(str(tmp_path / "memory"), str(tmp_path / "disk"))
    for root in places.roots():
        os.makedirs(os.path.join(root, f"{_dead_pid()}-dump"))
    assert len(workarea.sweep_all(places)) == 2
    assert os.listdir(places.disk) == [] and os.listdir(places.memory) == []
