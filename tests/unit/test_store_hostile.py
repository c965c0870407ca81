"""The store as hostile input: links, hard links and FIFOs anywhere, chunks included; bombs, oversized sizes."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import blake3
import pytest
import zstandard
from storekit import IDENT, base_manifest, make_checkpoint, published_entry

from hotrestart.store import archive
from hotrestart.store.chunkcodec import Codec
from hotrestart.store.entry import Entry, Fault, identity_key
from hotrestart.store.manifest import (
    MAX_CHUNK_RAW,
    MAX_CHUNK_STORED,
    MAX_MANIFEST,
    SCHEMA,
    Chunk,
    FileEntry,
    Manifest,
    ManifestError,
    chunk_root,
)
from hotrestart.store.safefs import UnsafeEntryError
from hotrestart.store.store import Store

REL = "images/pages.img.zst"  # the one file of storekit's checkpoints


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


def chunk_path(store: Store, entry: Entry, n: int = 0) -> Path:
    assert entry.manifest is not None
    digest = entry.manifest.files[0].chunks[n].digest
    return Path(store.root, "v1", "chunks", entry.manifest.space, digest[:2], digest)


class Hang(Exception):
    pass


def _hang(_signum: int, _frame: FrameType | None) -> None:
    raise Hang("blocked: a FIFO or device was opened and waited on")


@contextlib.contextmanager
def no_hang(seconds: float = 5.0) -> Iterator[None]:
    """Whatever blocks (a FIFO opened for reading) is interrupted, failing the test; the
    timer of pytest-timeout, if any, is put back."""
    previous = signal.signal(signal.SIGALRM, _hang)
    started = time.monotonic()
    outer, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - started), 0.001))


def exercise(store: Store, tmp: Path) -> None:
    """Everything that reads or changes the store; errors are allowed, escapes are not."""
    from hotrestart.cli import main

    def restore() -> None:
        for e in store.entries():
            if e.manifest is not None and e.state == "checkpoints":
                store.verify(e)
                with contextlib.suppress(archive.IntegrityError):
                    store.restore_file(e, REL, str(tmp / f"restored-{e.id}"))

    for step in (
        lambda: store.ensure(),
        lambda: store.mark_pending(IDENT, "c1"),
        lambda: store.is_pending(IDENT),
        lambda: store.clear_pending(IDENT, "c1"),
        lambda: make_checkpoint(store, tmp),
        lambda: make_checkpoint(store, tmp, os.urandom(1000)),
        lambda: [store.size(e) for e in store.entries()],
        restore,
        lambda: main(["--store", store.root, "verify"]),
        lambda: store.collect(now=time.time() + 86400, min_age=0),
        lambda: store.latest(IDENT) and store.claim(store.latest(IDENT)),  # type: ignore[arg-type]
        lambda: store.prune(grace=0, max_age=1, now=time.time() + 86400 * 2),
        lambda: list(map(store.remove, store.entries())),
        lambda: store.collect(now=time.time() + 86400, min_age=0),
        lambda: main(["--store", store.root, "ls", "-a"]),
    ):
        with contextlib.suppress(OSError, SystemExit), no_hang():
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
    "v1/checkpoints/{key}/{cid}/manifest.json",
    "v1/claimed/{cid}",
    "v1/quarantine/{cid}",
    "v1/chunks",
    "v1/chunks/{space}",
    "v1/chunks/{space}/{fan}",
    "v1/chunks/{space}/{fan}/{digest}",
    "v1/chunks/{space}/{fan}/.doomed-{digest}",
    "v1/gc.lock",
]


@pytest.mark.parametrize("position", LINK_POSITIONS)
def test_a_link_anywhere_in_the_store_is_never_followed(tmp_path: Path, position: str) -> None:
    store = Store(str(tmp_path / "s"))
    make_checkpoint(store, tmp_path)
    entry = published_entry(store)
    assert entry.manifest is not None
    digest = entry.manifest.files[0].chunks[0].digest
    out, before = sentinel(tmp_path)
    (out / "sub").mkdir()
    (out / "sub" / "file").write_bytes(b"x")
    (out / digest[:2]).mkdir()  # what a followed link would find, shaped like the store
    shutil.copy(chunk_path(store, entry), out / digest[:2] / digest)
    shutil.copy(chunk_path(store, entry), out / digest)
    before = snapshot(out)
    where = (
        tmp_path
        / "s"
        / position.format(
            key=identity_key(IDENT), cid=entry.id, space=entry.manifest.space, fan=digest[:2], digest=digest
        )
    )
    if where.is_dir() and not where.is_symlink():
        shutil.rmtree(where)
    elif os.path.lexists(where):
        where.unlink()
    where.parent.mkdir(parents=True, exist_ok=True)
    where.symlink_to(out / digest if position.endswith("digest}") else out)
    exercise(store, tmp_path)
    assert snapshot(out) == before, "nothing outside the store was written, chmodded or removed"


@pytest.mark.parametrize(
    "position", ["v1/chunks", "v1/chunks/{space}", "v1/chunks/{space}/{fan}", "v1/chunks/{space}/{fan}/{digest}"]
)
def test_a_restore_never_reads_a_chunk_through_a_link(tmp_path: Path, position: str) -> None:
    """Even a link to the very bytes the chunk should hold: nothing in the store is followed."""
    store = Store(str(tmp_path / "s"))
    payload = os.urandom(10_000)
    make_checkpoint(store, tmp_path, payload)
    entry = published_entry(store)
    assert entry.manifest is not None
    store.restore_file(entry, REL, str(tmp_path / "before"))
    assert (tmp_path / "before").read_bytes() == payload
    chunk = chunk_path(store, entry)
    where = tmp_path / "s" / position.format(space=entry.manifest.space, fan=chunk.parent.name, digest=chunk.name)
    moved = tmp_path / "moved"
    os.rename(where, moved)  # the real thing, moved out of the store
    where.symlink_to(moved)
    assert chunk.read_bytes()  # through the link, the chunk is there, whole
    with pytest.raises(archive.IntegrityError, match=r"symbolic link|not a folder"):
        store.restore_file(entry, REL, str(tmp_path / "out"))
    assert not os.path.lexists(tmp_path / "out")
    assert any("symbolic link" in p for p in store.verify(entry))


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


def test_collect_removes_an_unreferenced_planted_chunk_link_itself(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    make_checkpoint(store, tmp_path)
    out, before = sentinel(tmp_path)
    fan = tmp_path / "s" / "v1" / "chunks" / "plain" / "ab"
    fan.mkdir(parents=True, exist_ok=True)
    (fan / ("ab" * 32)).symlink_to(out / "precious")
    os.utime(fan / ("ab" * 32), (1, 1), follow_symlinks=False)
    removed, _ = store.collect(now=time.time() + 3600)
    assert removed == 1 and not os.path.lexists(fan / ("ab" * 32)) and snapshot(out) == before
    entry = published_entry(store)
    assert store.verify(entry) == []  # the checkpoint's own chunks were left alone


def test_a_hard_link_in_a_checkpoint_being_published_is_refused(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    out, before = sentinel(tmp_path)
    cid, staging = store.new_staging()
    os.link(out / "precious", Path(staging) / "planted")
    manifest = Manifest(cid, IDENT, time.time(), "n1", "stop", "img", "d", {}, {}, [], {})
    with pytest.raises(UnsafeEntryError, match="hard links"):
        store.publish(staging, manifest)
    assert snapshot(out) == before and os.stat(out / "precious").st_mode & 0o777 == 0o644


def test_a_hard_linked_chunk_is_never_written_through(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    payload = os.urandom(10_000)
    make_checkpoint(store, tmp_path, payload)
    entry = published_entry(store)
    out, _ = sentinel(tmp_path)
    chunk = chunk_path(store, entry)
    os.unlink(chunk)
    os.link(out / "precious", chunk)
    before = snapshot(out)
    with pytest.raises(archive.IntegrityError, match="hard-linked"):
        store.restore_file(entry, REL, str(tmp_path / "out"))
    assert not os.path.lexists(tmp_path / "out") and store.verify(entry)
    # The next checkpoint of the same bytes does not count on it: it writes the chunk anew,
    # in place of the link, not through it.
    make_checkpoint(store, tmp_path, payload)
    assert snapshot(out) == before and os.stat(chunk).st_nlink == 1
    store.restore_file(published_entry(store), REL, str(tmp_path / "out"))
    assert (tmp_path / "out").read_bytes() == payload
    exercise(store, tmp_path)
    assert snapshot(out) == before


def test_a_hard_linked_chunk_is_refused_even_with_the_right_bytes(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    make_checkpoint(store, tmp_path, os.urandom(10_000))
    entry = published_entry(store)
    chunk = chunk_path(store, entry)
    outside = tmp_path / "outside-chunk"
    os.rename(chunk, outside)
    os.link(outside, chunk)
    assert store.chunks.stored_size(entry.manifest.space, chunk.name) is None  # type: ignore[union-attr]
    try:
        store.restore_file(entry, REL, str(tmp_path / "out"))
    except archive.IntegrityError:
        assert not os.path.lexists(tmp_path / "out")
        return
    raise AssertionError("a chunk with another hard link was restored from")


@pytest.mark.parametrize(
    "body",
    [
        # From a newer node (an unknown field): unsupported, so retention keeps it, and every prune fails.
        '{"schema": "' + SCHEMA + '", "files": [{"chunks": 1}], "from_a_newer_node": 1}',
        '{"schema": "' + SCHEMA + '", "files": 7, "from_a_newer_node": 1}',
        '{"schema": "' + SCHEMA + '", "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
    ],
    ids=["chunks-number", "files-number", "deep"],
)
def test_collection_survives_any_manifest(tmp_path: Path, body: str) -> None:
    store = Store(str(tmp_path / "s"))
    make_checkpoint(store, tmp_path)
    entry = published_entry(store)
    (Path(entry.path) / "manifest.json").write_text(body)
    store.collect(now=time.time() + 86400, min_age=0)
    store.prune(now=time.time())  # within the grace period, a corrupt entry is kept
    assert [e.id for e in store.entries()] == [entry.id]


def fifo_in_place(path: Path) -> None:
    if os.path.lexists(path):
        os.unlink(path)
    os.mkfifo(path)


def test_a_fifo_in_a_checkpoint_never_blocks(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    make_checkpoint(store, tmp_path)
    entry = published_entry(store)
    chunk = chunk_path(store, entry)
    with no_hang():
        fifo_in_place(chunk)
        assert any("FIFO" in p for p in store.verify(entry))
        with pytest.raises(archive.IntegrityError, match="FIFO"):
            store.restore_file(entry, REL, str(tmp_path / "out"))
        assert not os.path.lexists(tmp_path / "out")
        # Where a chunk being collected is looked for, too.
        os.unlink(chunk)
        fifo_in_place(chunk.with_name(".doomed-" + chunk.name))
        with pytest.raises(archive.IntegrityError, match="FIFO"):
            store.restore_file(entry, REL, str(tmp_path / "out"))
        exercise(store, tmp_path)
        # And as the manifest.
        make_checkpoint(store, tmp_path)
        entry = published_entry(store)
        fifo_in_place(Path(entry.path) / "manifest.json")
        [bad] = store.published(IDENT)
        assert bad.fault is Fault.CORRUPT and "FIFO" in bad.problem


@pytest.mark.parametrize("kind", ["folder", "socket", "sparse", "empty", "doomed-only", "gone"])
def test_what_is_not_a_chunk_file_is_refused(tmp_path: Path, kind: str) -> None:
    store = Store(str(tmp_path / "s"))
    payload = os.urandom(10_000)
    make_checkpoint(store, tmp_path, payload)
    entry = published_entry(store)
    chunk = chunk_path(store, entry)
    if kind == "doomed-only":  # set aside by a collection: still read, from there
        os.rename(chunk, chunk.with_name(".doomed-" + chunk.name))
        store.restore_file(entry, REL, str(tmp_path / "out"))
        assert (tmp_path / "out").read_bytes() == payload and store.verify(entry) == []
        return
    os.unlink(chunk)
    if kind == "folder":
        chunk.mkdir()
        (chunk / "x").write_bytes(b"x")
    elif kind == "socket":
        os.mknod(chunk, 0o600 | 0o140000)
    elif kind == "sparse":
        with open(chunk, "wb") as f:
            f.truncate(1 << 40)  # a terabyte that takes no room: only what the manifest says is read
    elif kind == "empty":
        chunk.write_bytes(b"")
    with no_hang():
        with pytest.raises(archive.IntegrityError):
            store.restore_file(entry, REL, str(tmp_path / "out"))
        assert not os.path.lexists(tmp_path / "out")
        assert store.verify(entry)
        if kind in ("socket", "gone"):  # a new checkpoint of the same bytes puts a real chunk back
            make_checkpoint(store, tmp_path, payload)
            store.restore_file(published_entry(store), REL, str(tmp_path / "out"))
            assert (tmp_path / "out").read_bytes() == payload


@pytest.mark.parametrize("size", [0, 1 << 40])
def test_a_chunk_file_of_impossible_size_is_written_anew(tmp_path: Path, size: int) -> None:
    store = Store(str(tmp_path / "s"))
    payload = os.urandom(10_000)
    make_checkpoint(store, tmp_path, payload)
    chunk = chunk_path(store, published_entry(store))
    os.truncate(chunk, size)
    make_checkpoint(store, tmp_path, payload)
    entry = store.latest(IDENT)
    assert entry is not None, [e.problem for e in store.published(IDENT)]
    store.restore_file(entry, REL, str(tmp_path / "out"))
    assert (tmp_path / "out").read_bytes() == payload


def test_odd_names_among_the_chunks_are_left_alone(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    payload = os.urandom(10_000)
    make_checkpoint(store, tmp_path, payload)
    entry = published_entry(store)
    chunk = chunk_path(store, entry)
    chunks = tmp_path / "s" / "v1" / "chunks"
    odd = [
        chunks / "plain" / "zz",
        chunks / "other-space",
        chunks / ("K-" + "0" * 24),
        chunk.parent / chunk.name.upper(),
        chunk.parent / (chunk.name + ".zst"),
        chunk.parent / "a b",
        chunk.parent / ("0" * 64),  # a digest in the wrong fan
    ]
    for p in odd:
        p.write_bytes(b"odd")
        os.utime(p, (1, 1))
    (chunks / "plain" / "deep").mkdir()
    deep = chunks / "plain" / "deep"
    for _ in range(40):
        deep = deep / "d"
    deep.mkdir(parents=True)
    before = {p: p.read_bytes() for p in odd}
    assert store.collect(now=time.time() + 86400, min_age=0) == (0, 0)
    assert {p: p.read_bytes() for p in odd} == before  # not ours: not removed, not read as chunks
    store.restore_file(entry, REL, str(tmp_path / "out"))
    assert (tmp_path / "out").read_bytes() == payload


def test_a_chunk_name_from_the_manifest_never_leaves_the_chunks(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    make_checkpoint(store, tmp_path)
    entry = published_entry(store)
    assert entry.manifest is not None
    for space, digest in [("..", "ab" * 32), ("plain", "../../" + "a" * 58), ("plain/..", "ab" * 32)]:
        with pytest.raises(archive.IntegrityError, match="not a chunk name"):
            store.chunks.read(space, digest, 10)
    text = entry.manifest.to_json()
    for bad in ('"space": "../checkpoints"', '"space": "plain/.."', '"space": ""'):
        with pytest.raises(ManifestError):
            Manifest.from_json(text.replace('"space": "plain"', bad))
    digest = entry.manifest.files[0].chunks[0].digest
    with pytest.raises(ManifestError):
        Manifest.from_json(text.replace(f'"digest": "{digest}"', '"digest": "../' + digest[3:] + '"'))


def bomb_entry(raw: int, declared: int, window_log: int = 17) -> tuple[FileEntry, bytes]:
    """A chunk that decompresses to `raw` zeros, declared as `declared`, named for its first
    `declared` bytes: only the frame's length gives it away (its window is a small one)."""
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=window_log)
    frame = zstandard.ZstdCompressor(compression_params=params).compress(b"\0" * raw)
    chunk = Chunk(stored=len(frame), raw=declared, digest=blake3.blake3(b"\0" * declared).hexdigest())
    return FileEntry("bomb.zst", chunk_root([chunk]), len(frame), declared, [chunk]), frame


def reader(frames: dict[str, bytes]) -> archive.ReadChunk:
    def read(digest: str, size: int) -> bytes:
        data = frames[digest]
        if len(data) != size:
            raise archive.IntegrityError(f"chunk {digest[:16]}: {len(data)} bytes stored, the manifest says {size}")
        return data

    return read


def test_a_decompression_bomb_never_writes_more_than_declared(tmp_path: Path) -> None:
    fe, frame = bomb_entry(32 << 20, 4096)  # 32 MiB of zeros in a few KiB, declared as 4 KiB
    assert fe.stored_bytes < 8192
    read = reader({fe.chunks[0].digest: frame})
    with pytest.raises(archive.IntegrityError, match="more than 4096"):
        archive.restore_file(fe, str(tmp_path / "out"), read, Codec())
    assert not (tmp_path / "out").exists()
    with pytest.raises(archive.IntegrityError, match="more than 4096"):
        archive.verify_file(fe, read, Codec())
    # One that asks for a window larger than the chunk is refused before it is decoded.
    big_window, frame2 = bomb_entry(32 << 20, 4096, window_log=25)
    with pytest.raises(archive.IntegrityError, match="too much memory"):
        archive.restore_file(big_window, str(tmp_path / "out"), reader({fe.chunks[0].digest: frame2}), Codec())
    assert not (tmp_path / "out").exists()
    # The same frame among others in a store, read back by a restore: refused as well.
    store = Store(str(tmp_path / "s"))
    make_checkpoint(store, tmp_path, os.urandom(10_000))
    entry = published_entry(store)
    assert entry.manifest is not None
    entry.manifest.files = [dataclasses.replace(fe, path=REL)]
    fan = Path(store.root, "v1", "chunks", "plain", fe.chunks[0].digest[:2])
    fan.mkdir(exist_ok=True)
    (fan / fe.chunks[0].digest).write_bytes(frame)
    with pytest.raises(archive.IntegrityError, match="more than 4096"):
        store.restore_file(entry, REL, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_short_frame_is_refused(tmp_path: Path) -> None:
    fe, frame = bomb_entry(4096, 4096)
    fe.chunks[0].raw = fe.raw_bytes = 8192
    fe.digest = chunk_root(fe.chunks)
    with pytest.raises(archive.IntegrityError, match="4096 bytes, not 8192"):
        archive.restore_file(fe, str(tmp_path / "out"), reader({fe.chunks[0].digest: frame}), Codec())
    assert not (tmp_path / "out").exists()


def test_raw_sizes_are_capped_before_anything_is_written(tmp_path: Path) -> None:
    fe, frame = bomb_entry(1 << 20, 1 << 20)
    read = reader({fe.chunks[0].digest: frame})
    with pytest.raises(archive.IntegrityError, match="allowed"):
        archive.restore_file(fe, str(tmp_path / "out"), read, Codec(), cap=(1 << 20) - 1)
    assert not (tmp_path / "out").exists()
    with pytest.raises(archive.IntegrityError, match="allowed"):
        archive.verify_file(fe, read, Codec(), cap=(1 << 20) - 1)
    archive.restore_file(fe, str(tmp_path / "out"), read, Codec(), cap=1 << 20)
    assert (tmp_path / "out").read_bytes() == b"\0" * (1 << 20)
    for chunk in (
        dataclasses.replace(fe.chunks[0], raw=MAX_CHUNK_RAW + 1),
        dataclasses.replace(fe.chunks[0], stored=MAX_CHUNK_STORED + 1),
    ):
        big = dataclasses.replace(
            fe,
            chunks=[chunk],
            digest=chunk_root([chunk]),
            raw_bytes=chunk.raw,
            stored_bytes=chunk.stored,
        )
        with pytest.raises(archive.IntegrityError, match="larger than"):
            archive.restore_file(big, str(tmp_path / "out2"), read, Codec())
        assert not (tmp_path / "out2").exists()
    text = json.dumps(
        {"schema": SCHEMA, **{k: v for k, v in json.loads(base_manifest()).items() if k != "schema"}}
    ).replace('"raw": 6000', f'"raw": {MAX_CHUNK_RAW + 1}')
    Manifest.from_json(base_manifest())
    with pytest.raises(ManifestError):
        Manifest.from_json(text)


def test_a_chunk_store_read_is_bounded_by_the_manifest(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    make_checkpoint(store, tmp_path)
    entry = published_entry(store)
    assert entry.manifest is not None
    c = entry.manifest.files[0].chunks[0]
    for size in (0, -1, MAX_CHUNK_STORED + 1):
        with pytest.raises(archive.IntegrityError, match="out of range"):
            store.chunks.read("plain", c.digest, size)
    with pytest.raises(archive.IntegrityError, match="the manifest says"):
        store.chunks.read("plain", c.digest, c.stored - 1)
    assert len(store.chunks.read("plain", c.digest, c.stored)) == c.stored


def test_a_manifest_too_large_to_be_read_back_is_refused_when_written() -> None:
    """Published, it would only be refused at the next create, which would start cold."""
    chunk = Chunk(100, 6000, "ab" * 32)
    chunks = [chunk] * (MAX_MANIFEST // 150)
    files = [FileEntry("images/pages-1.img.zst", chunk_root(chunks), 100 * len(chunks), 6000 * len(chunks), chunks)]
    manifest = Manifest("c-1", IDENT, 1000.0, "n1", "stop", "img", "d", {"criu": "4.2"}, {}, files, {"dump": 1.0})
    with pytest.raises(ManifestError, match="larger than"):
        manifest.to_json()
