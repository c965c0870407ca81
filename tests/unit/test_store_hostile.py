"""The store as hostile input: links, hard links and FIFOs in every position, decompression bombs, oversized sizes."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import zstandard
from storekit import IDENT, base_manifest, make_checkpoint, published_entry

from hotrestart.store import archive
from hotrestart.store.entry import Fault, identity_key
from hotrestart.store.manifest import MAX_CHUNK_RAW, SCHEMA, Chunk, FileEntry, Manifest, ManifestError, chunk_root
from hotrestart.store.safefs import UnsafeEntryError
from hotrestart.store.store import Store


def sentinel(tmp: Path) -> tuple[Path, dict[str, tuple[bytes, int, float]]]:
    """A folder outside the store, and what it must still be after anything the store does."""
    out = tmp / "outside"
    out.mkdir(exist_ok=True)
    os.chmod(out, 0o755)
    (out / "precious").write_bytes(b"keep me")
    os.chmod(out / "precious", 0o644)
    return out, snapshot(out)


def snapshot(out: Path) -> dict[str, tuple[bytes, int, float]]:
    found = {".": (b"", os.lstat(out).st_mode, os.lstat(out).st_mtime)}
    for p in out.rglob("*"):
        st = os.lstat(p)
        found[str(p.relative_to(out))] = (p.read_bytes() if p.is_file() else b"", st.st_mode, st.st_mtime)
    return found


def exercise(store: Store, tmp: Path) -> None:
    """Everything that reads or changes the store; errors are allowed, escapes are not."""
    from hotrestart.cli import main

    for step in (
        lambda: store.ensure(),
        lambda: store.mark_pending(IDENT, "c1"),
        lambda: store.is_pending(IDENT),
        lambda: store.clear_pending(IDENT, "c1"),
        lambda: make_checkpoint(store, tmp),
        lambda: [store.size(e) for e in store.entries()],
        lambda: store.latest(IDENT) and store.claim(store.latest(IDENT)),  # type: ignore[arg-type]
        lambda: store.prune(grace=0, max_age=1, now=time.time() + 86400 * 2),
        lambda: list(map(store.remove, store.entries())),
        lambda: main(["--store", store.root, "ls", "-a"]),
    ):
        with contextlib.suppress(OSError, SystemExit):
            step()


LINK_POSITIONS = [
    "v1",
    "v1/pending",
    "v1/staging",
    "v1/checkpoints",
    "v1/claimed",
    "v1/quarantine",
    "v1/checkpoints/{key}",
    "v1/checkpoints/{key}/{cid}",
    "v1/checkpoints/{key}/{cid}/images",
    "v1/claimed/{cid}",
    "v1/quarantine/{cid}",
]


@pytest.mark.parametrize("position", LINK_POSITIONS)
def test_a_link_anywhere_in_the_store_is_never_followed(tmp_path: Path, position: str) -> None:
    store = Store(str(tmp_path / "s"))
    cid = make_checkpoint(store, tmp_path)
    out, before = sentinel(tmp_path)
    (out / "sub").mkdir()
    (out / "sub" / "file").write_bytes(b"x")
    before = snapshot(out)
    where = tmp_path / "s" / position.format(key=identity_key(IDENT), cid=cid)
    if where.is_dir():
        shutil.rmtree(where)
    where.parent.mkdir(parents=True, exist_ok=True)
    where.symlink_to(out)
    exercise(store, tmp_path)
    assert snapshot(out) == before, "nothing outside the store was written, chmodded or removed"


def test_prune_removes_a_planted_link_itself_not_what_it_points_at(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    store.ensure()
    out, before = sentinel(tmp_path)
    (tmp_path / "s" / "v1" / "claimed" / "c-1").symlink_to(out)
    os.utime(tmp_path / "s" / "v1" / "claimed" / "c-1", (1, 1), follow_symlinks=False)
    [bad] = list(store.entries())
    assert bad.fault is Fault.UNSAFE and "symbolic link" in bad.problem
    assert [e.id for e in store.prune()] == ["c-1"]
    assert not os.path.lexists(tmp_path / "s" / "v1" / "claimed" / "c-1") and snapshot(out) == before


def test_a_hard_link_in_a_checkpoint_being_published_is_refused(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    out, before = sentinel(tmp_path)
    cid, staging = store.new_staging()
    os.link(out / "precious", Path(staging) / "planted")
    manifest = Manifest(cid, IDENT, time.time(), "n1", "stop", "img", "d", {}, {}, [], {})
    with pytest.raises(UnsafeEntryError, match="hard links"):
        store.publish(staging, manifest)
    assert snapshot(out) == before and os.stat(out / "precious").st_mode & 0o777 == 0o644


def test_a_fifo_in_a_checkpoint_never_blocks(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    make_checkpoint(store, tmp_path)
    entry = published_entry(store)
    assert entry.manifest is not None
    fe = entry.manifest.files[0]
    os.unlink(Path(entry.path) / fe.path)
    os.mkfifo(Path(entry.path) / fe.path)
    signal.setitimer(signal.ITIMER_REAL, 5)
    try:
        assert any("FIFO" in p for p in store.verify(entry))
        with pytest.raises(archive.IntegrityError):
            store.restore_file(entry, fe.path, str(tmp_path / "out"))
        with pytest.raises(archive.IntegrityError, match="not a regular file"):
            archive.decompress_file(os.path.join(entry.path, fe.path), str(tmp_path / "out"), fe)
        os.unlink(Path(entry.path) / "manifest.json")
        os.mkfifo(Path(entry.path) / "manifest.json")
        [bad] = list(store.entries())
        assert bad.fault is Fault.CORRUPT and "FIFO" in bad.problem
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def bomb_entry(tmp: Path, raw: int, declared: int) -> FileEntry:
    frame = zstandard.ZstdCompressor(level=3).compress(b"\0" * raw)
    (tmp / "bomb.zst").write_bytes(frame)
    chunk = Chunk(stored=len(frame), raw=declared, sha256=hashlib.sha256(frame).hexdigest())
    return FileEntry("bomb.zst", chunk_root([chunk]), len(frame), declared, [chunk])


def test_a_decompression_bomb_never_writes_more_than_declared(tmp_path: Path) -> None:
    fe = bomb_entry(tmp_path, 32 << 20, 4096)  # 32 MiB of zeros in a few KiB, declared as 4 KiB
    assert fe.stored_bytes < 8192
    with pytest.raises(archive.IntegrityError, match="more than 4096"):
        archive.decompress_file(str(tmp_path / "bomb.zst"), str(tmp_path / "out"), fe)
    assert not (tmp_path / "out").exists()
    with pytest.raises(archive.IntegrityError, match="more than"):
        archive.verify_file(str(tmp_path / "bomb.zst"), fe)


def test_raw_sizes_are_capped_before_anything_is_written(tmp_path: Path) -> None:
    fe = bomb_entry(tmp_path, 1 << 20, 1 << 20)
    with pytest.raises(archive.IntegrityError, match="allowed"):
        archive.decompress_file(str(tmp_path / "bomb.zst"), str(tmp_path / "out"), fe, cap=(1 << 20) - 1)
    assert not (tmp_path / "out").exists()
    archive.decompress_file(str(tmp_path / "bomb.zst"), str(tmp_path / "out"), fe, cap=1 << 20)
    big = dataclasses.replace(fe, chunks=[dataclasses.replace(fe.chunks[0], raw=MAX_CHUNK_RAW + 1)])
    big.raw_bytes = MAX_CHUNK_RAW + 1
    with pytest.raises(archive.IntegrityError, match="larger than"):
        archive.decompress_file(str(tmp_path / "bomb.zst"), str(tmp_path / "out2"), big)
    text = json.dumps(
        {"schema": SCHEMA, **{k: v for k, v in json.loads(base_manifest()).items() if k != "schema"}}
    ).replace('"raw": 6000', f'"raw": {MAX_CHUNK_RAW + 1}')
    with pytest.raises(ManifestError):
        Manifest.from_json(text)
