"""Chunked checkpoint files: round trips, shared chunks, integrity, keys, caps, direct and buffered writes, ENOSPC."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3
import pytest
from storekit import IDENT, ring_of, store_file

from hotrestart.store import archive, chunking
from hotrestart.store.chunkcodec import Codec
from hotrestart.store.entry import Entry
from hotrestart.store.manifest import MAX_CHUNK_RAW, FileEntry, Identity, Manifest, chunk_root
from hotrestart.store.store import Store

REL = "images/pages-1.img.zst"
SMALL = 64 << 10  # chunk size for these tests: many chunks from a small payload


@dataclasses.dataclass
class Written:
    entry: Entry
    new_bytes: int
    shared_bytes: int
    raw_new: int

    @property
    def file(self) -> FileEntry:
        assert self.entry.manifest is not None
        return self.entry.manifest.files[0]


def checkpoint(store: Store, tmp: Path, payload: bytes, *, ident: Identity = IDENT, chunk: int = SMALL) -> Written:
    """Publish a checkpoint of one file through the store's ChunkWriter, cut every `chunk` bytes."""
    cid, staging = store.new_staging()
    src = tmp / f"raw-{cid}"
    src.write_bytes(payload)
    writer = store.chunk_writer(staging)
    try:
        fe = store_file(writer, src, REL, chunk=chunk)
        writer.finish()
    finally:
        writer.close()
    src.unlink()
    manifest = Manifest(
        id=cid,
        identity=ident,
        created_at=time.time(),
        node="n1",
        reason="stop",
        image="img",
        spec_digest="d",
        runtime={},
        network={},
        files=[fe],
        timings={},
        space=writer.space,
        new_bytes=writer.new_bytes,
    )
    assert store.publish(staging, manifest, store.sealer(cid)) is not None
    entry = store.latest(ident)
    assert entry is not None and entry.id == cid and entry.manifest is not None
    return Written(entry, writer.new_bytes, writer.shared_bytes, writer.raw_new)


def chunks_dir(store: Store) -> Path:
    return Path(store.root, "v1", "chunks")


def chunk_files(store: Store) -> dict[str, tuple[int, int, int]]:
    """Every file under the chunks folder (links included, not followed): (size, inode, mtime)."""
    found = {}
    for dirpath, _dirs, names in os.walk(chunks_dir(store)):
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            found[os.path.relpath(os.path.join(dirpath, name), chunks_dir(store))] = (
                st.st_size,
                st.st_ino,
                st.st_mtime_ns,
            )
    return found


def chunk_path(store: Store, space: str, digest: str) -> Path:
    return chunks_dir(store) / space / digest[:2] / digest


def distinct_chunks(n: int, tail: bytes = b"") -> bytes:
    """`n` chunks of SMALL bytes, each different, half random and half zeros (so compressible)."""
    return b"".join(os.urandom(2048) + bytes(2048) for _ in range(n * SMALL // 4096)) + tail


def plain_reader(store: Store, space: str = "plain") -> archive.ReadChunk:
    return lambda digest, size: store.chunks.read(space, digest, size)


def never_read(digest: str, size: int) -> bytes:
    raise AssertionError("a chunk was read before the entry was checked")


# -- round trips ----------------------------------------------------------------------------------


def test_round_trip_through_the_chunks(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    payload = distinct_chunks(6, b"odd tail")
    written = checkpoint(store, tmp_path, payload)
    fe = written.file
    assert [c.raw for c in fe.chunks] == [n for _, n in chunking.fixed(len(payload), SMALL)]
    assert fe.raw_bytes == len(payload) and fe.digest == chunk_root(fe.chunks)
    at = 0
    for c in fe.chunks:
        assert c.digest == blake3.blake3(payload[at : at + c.raw]).hexdigest(), "a chunk is named by its bytes"
        assert chunk_path(store, "plain", c.digest).stat().st_size == c.stored
        at += c.raw
    assert fe.stored_bytes < len(payload) * 0.6, "chunks are compressed"
    assert len(chunk_files(store)) == len(fe.chunks)
    assert written.new_bytes == fe.stored_bytes == sum(s for s, _, _ in chunk_files(store).values())
    assert written.raw_new == len(payload) and written.shared_bytes == 0
    assert written.entry.manifest is not None and written.entry.manifest.new_bytes == written.new_bytes

    archive.restore_file(fe, str(tmp_path / "out"), plain_reader(store), Codec())
    assert (tmp_path / "out").read_bytes() == payload
    assert oct((tmp_path / "out").stat().st_mode & 0o777) == "0o600"
    archive.verify_file(fe, plain_reader(store), Codec())
    store.restore_file(written.entry, REL, str(tmp_path / "out2"))
    assert (tmp_path / "out2").read_bytes() == payload
    assert store.verify(written.entry) == []


def test_a_single_chunk_and_an_empty_file_round_trip(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    one = checkpoint(store, tmp_path, b"small file")
    assert len(one.file.chunks) == 1
    store.restore_file(one.entry, REL, str(tmp_path / "one"))
    assert (tmp_path / "one").read_bytes() == b"small file"
    empty = checkpoint(store, tmp_path, b"")
    assert empty.file.chunks == [] and empty.file.raw_bytes == 0 and empty.new_bytes == 0
    store.restore_file(empty.entry, REL, str(tmp_path / "empty"))
    assert (tmp_path / "empty").read_bytes() == b""
    assert store.verify(empty.entry) == []


@pytest.mark.parametrize("workers", [1, 8])
def test_a_chunk_repeated_within_a_file_is_stored_once(tmp_path: Path, workers: int) -> None:
    """With many workers too: one writes it while the others wait, and it is counted once."""
    store = Store(str(tmp_path / "s"))
    block = os.urandom(SMALL)
    payload = block * 8
    src = tmp_path / "raw"
    src.write_bytes(payload)
    _cid, staging = store.new_staging()
    writer = store.chunk_writer(staging)
    try:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            fe = writer.store_file(str(src), REL, chunking.fixed(len(payload), SMALL), pool)
        writer.finish()
    finally:
        writer.close()
    [(size, _, _)] = chunk_files(store).values()
    assert len({c.digest for c in fe.chunks}) == 1 and len(fe.chunks) == 8
    assert writer.new_bytes == size and writer.shared_bytes == 7 * size and writer.raw_new == SMALL
    archive.restore_file(fe, str(tmp_path / "out"), plain_reader(store), Codec())
    assert (tmp_path / "out").read_bytes() == payload


def test_a_page_image_is_stored_as_its_cutter_cuts_it_and_a_cutter_that_leaves_a_gap_is_refused(
    tmp_path: Path,
) -> None:
    pages = (12 << 20) // chunking.PAGE
    payload = b"".join(os.urandom(chunking.PAGE // 2) + bytes(chunking.PAGE // 2) for _ in range(pages))
    src = tmp_path / "pages-1.img"
    src.write_bytes(payload)
    store = Store(str(tmp_path / "s"))
    _cid, staging = store.new_staging()
    writer = store.chunk_writer(staging)
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            fe = writer.store_file(str(src), REL, chunking.cutter(src.name, {1: [(0x7F0000000000, pages)]}), pool)
            expected = list(chunking.by_content(memoryview(payload), [(0x7F0000000000, pages)]))
            assert [c.raw for c in fe.chunks] == [n for _, n in expected] and len(expected) > 1
            for gap in ([(0, 1 << 20), (2 << 20, len(payload) - (2 << 20))], [(0, 1 << 20)], [(0, 0)]):
                with pytest.raises(ValueError, match="do not cover"):
                    writer.store_file(str(src), REL, lambda _data, spans=gap: iter(spans), pool)
        writer.finish()
    finally:
        writer.close()
    archive.restore_file(fe, str(tmp_path / "out"), plain_reader(store), Codec())
    assert (tmp_path / "out").read_bytes() == payload


# -- shared chunks --------------------------------------------------------------------------------


def test_a_second_checkpoint_of_the_same_payload_writes_nothing(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    payload = distinct_chunks(5)
    first = checkpoint(store, tmp_path, payload)
    before = chunk_files(store)
    second = checkpoint(store, tmp_path, payload)
    assert second.new_bytes == 0 and second.raw_new == 0
    assert second.shared_bytes == first.new_bytes == first.file.stored_bytes
    assert second.entry.manifest is not None and second.entry.manifest.new_bytes == 0
    assert chunk_files(store) == before, "no chunk file written, replaced or touched"
    assert second.file.chunks == first.file.chunks
    store.restore_file(second.entry, REL, str(tmp_path / "out"))
    assert (tmp_path / "out").read_bytes() == payload


def test_a_checkpoint_with_one_changed_chunk_writes_just_that_one(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    payload = distinct_chunks(8)
    first = checkpoint(store, tmp_path, payload)
    before = chunk_files(store)
    changed = bytearray(payload)
    changed[3 * SMALL + 100] ^= 0x01
    second = checkpoint(store, tmp_path, bytes(changed))
    new = set(chunk_files(store)) - set(before)
    moved = second.file.chunks[3]
    assert new == {f"plain/{moved.digest[:2]}/{moved.digest}"}
    assert [c.digest for i, c in enumerate(second.file.chunks) if i != 3] == [
        c.digest for i, c in enumerate(first.file.chunks) if i != 3
    ]
    assert second.raw_new == SMALL and second.new_bytes == moved.stored
    assert second.shared_bytes == first.new_bytes - first.file.chunks[3].stored
    assert {k: v for k, v in chunk_files(store).items() if k not in new} == before
    store.restore_file(second.entry, REL, str(tmp_path / "out"))
    assert (tmp_path / "out").read_bytes() == changed


def test_two_identities_with_the_same_payload_store_its_chunks_once(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    payload = distinct_chunks(4)
    other = Identity("ns", "web-1", "app")
    a = checkpoint(store, tmp_path, payload)
    b = checkpoint(store, tmp_path, payload, ident=other)
    assert a.entry.path != b.entry.path, "two checkpoints, both kept"
    assert b.new_bytes == 0 and b.file.chunks == a.file.chunks
    assert len(chunk_files(store)) == len(a.file.chunks)
    for entry, dst in ((a.entry, "a"), (b.entry, "b")):
        store.restore_file(entry, REL, str(tmp_path / dst))
        assert (tmp_path / dst).read_bytes() == payload
    # Removing one checkpoint leaves the other whole: its chunks are still referenced.
    store.remove(a.entry)
    later = time.time() + 3600
    assert store.collect(now=later, min_age=0) == (0, 0)
    store.restore_file(b.entry, REL, str(tmp_path / "b2"))
    assert (tmp_path / "b2").read_bytes() == payload
    store.remove(b.entry)
    assert store.collect(now=later, min_age=0) == (len(a.file.chunks), a.file.stored_bytes)
    assert chunk_files(store) == {}


# -- integrity ------------------------------------------------------------------------------------


def _flip(path: Path, tmp: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def _truncate(path: Path, tmp: Path) -> None:
    path.write_bytes(path.read_bytes()[:-10])


def _extend(path: Path, tmp: Path) -> None:
    path.write_bytes(path.read_bytes() + b"\0")


def _remove(path: Path, tmp: Path) -> None:
    path.unlink()


def _symlink(path: Path, tmp: Path) -> None:
    # The link points at an intact copy: only refusing the link itself fails the read.
    shutil.copy(path, tmp / "copy")
    path.unlink()
    path.symlink_to(tmp / "copy")


def _folder_symlink(path: Path, tmp: Path) -> None:
    shutil.copytree(path.parent, tmp / "fan")
    shutil.rmtree(path.parent)
    path.parent.symlink_to(tmp / "fan")


DAMAGE: dict[str, Callable[[Path, Path], None]] = {
    "flipped byte": _flip,
    "truncated": _truncate,
    "extended": _extend,
    "missing": _remove,
    "symlink": _symlink,
    "folder symlink": _folder_symlink,
}
WHY = {
    # Where the flip lands decides which check sees it first.
    "flipped byte": "do not match its name|not valid zstd|decompressed to",
    "truncated": "bytes stored, the manifest says",
    "extended": "bytes stored, the manifest says",
    "missing": "missing from the store",
    "symlink": "symbolic link",
    "folder symlink": "symbolic link",
}


@pytest.mark.parametrize("chunks", [1, 7])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_chunk_is_refused_and_nothing_is_left(tmp_path: Path, damage: str, chunks: int) -> None:
    store = Store(str(tmp_path / "s"))
    payload = distinct_chunks(chunks - 1, os.urandom(1000) + bytes(3000))
    written = checkpoint(store, tmp_path, payload)
    fe = written.file
    assert len(fe.chunks) == chunks
    target = fe.chunks[chunks // 2]
    DAMAGE[damage](chunk_path(store, "plain", target.digest), tmp_path)
    with pytest.raises(archive.IntegrityError, match=WHY[damage]) as refused:
        store.restore_file(written.entry, REL, str(tmp_path / "out"))
    assert target.digest[:16] in str(refused.value)
    assert not (tmp_path / "out").exists(), "nothing of a bad file is left for a restore to use"
    with pytest.raises(archive.IntegrityError):
        archive.restore_file(fe, str(tmp_path / "out"), plain_reader(store), Codec())
    assert not (tmp_path / "out").exists()
    [problem] = store.verify(written.entry)
    assert problem.startswith(REL) and target.digest[:16] in problem


def test_a_chunk_stored_under_another_chunks_name_is_refused(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    written = checkpoint(store, tmp_path, os.urandom(2 * SMALL))
    first, second = written.file.chunks
    assert first.stored == second.stored, "random chunks of one size: frames of one size"
    shutil.copy(chunk_path(store, "plain", first.digest), chunk_path(store, "plain", second.digest))
    with pytest.raises(archive.IntegrityError, match="do not match its name"):
        store.restore_file(written.entry, REL, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["symlink", "hard link"])
def test_a_chunk_replaced_by_a_link_is_written_again(tmp_path: Path, kind: str) -> None:
    store = Store(str(tmp_path / "s"))
    payload = distinct_chunks(3)
    first = checkpoint(store, tmp_path, payload)
    path = chunk_path(store, "plain", first.file.chunks[1].digest)
    outside = tmp_path / "outside"
    shutil.copy(path, outside)
    path.unlink()
    if kind == "symlink":
        path.symlink_to(outside)
        with pytest.raises(archive.IntegrityError, match="symbolic link"):
            store.restore_file(first.entry, REL, str(tmp_path / "out"))
    else:
        os.link(outside, path)
    kept = outside.read_bytes()
    second = checkpoint(store, tmp_path, payload)
    assert second.raw_new == SMALL and second.new_bytes == first.file.chunks[1].stored
    st = os.lstat(path)
    assert path.is_file() and not path.is_symlink() and st.st_nlink == 1
    assert outside.read_bytes() == kept and os.stat(outside).st_nlink == 1, "nothing written through the link"
    store.restore_file(second.entry, REL, str(tmp_path / "out2"))
    assert (tmp_path / "out2").read_bytes() == payload


def test_an_entry_that_does_not_add_up_is_refused_before_a_chunk_is_read(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    fe = checkpoint(store, tmp_path, distinct_chunks(3)).file
    out = str(tmp_path / "out")
    swapped = dataclasses.replace(fe, chunks=[fe.chunks[1], fe.chunks[0], fe.chunks[2]])
    with pytest.raises(archive.IntegrityError, match="digest"):
        archive.restore_file(swapped, out, never_read, Codec())
    with pytest.raises(archive.IntegrityError, match="sizes"):
        archive.restore_file(dataclasses.replace(fe, raw_bytes=fe.raw_bytes + 1), out, never_read, Codec())
    with pytest.raises(archive.IntegrityError, match="sizes"):
        archive.verify_file(dataclasses.replace(fe, stored_bytes=fe.stored_bytes - 1), never_read, Codec())
    huge = [dataclasses.replace(c, raw=MAX_CHUNK_RAW + 1) for c in fe.chunks]
    oversized = dataclasses.replace(fe, chunks=huge, raw_bytes=sum(c.raw for c in huge))
    with pytest.raises(archive.IntegrityError, match="larger"):
        archive.restore_file(oversized, out, never_read, Codec())
    assert not os.path.exists(out)


@pytest.mark.parametrize(("delta", "why"), [(-1, "more than"), (1, "decompressed to")])
def test_a_chunk_whose_bytes_are_not_its_declared_size_is_refused(tmp_path: Path, delta: int, why: str) -> None:
    # The manifest's sizes add up and its digest matches: only the chunk's own size lies.
    store = Store(str(tmp_path / "s"))
    fe = checkpoint(store, tmp_path, distinct_chunks(3)).file
    lying = [dataclasses.replace(c, raw=c.raw + delta) if i == 1 else c for i, c in enumerate(fe.chunks)]
    entry = dataclasses.replace(fe, chunks=lying, raw_bytes=fe.raw_bytes + delta)
    with pytest.raises(archive.IntegrityError, match=why):
        archive.restore_file(entry, str(tmp_path / "out"), plain_reader(store), Codec())
    assert not (tmp_path / "out").exists()
    with pytest.raises(archive.IntegrityError, match=why):
        archive.verify_file(entry, plain_reader(store), Codec())


def test_a_cap_refuses_a_larger_file_before_a_chunk_is_read(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    payload = distinct_chunks(2, b"x")
    written = checkpoint(store, tmp_path, payload)
    fe = written.file
    with pytest.raises(archive.IntegrityError, match="allowed"):
        archive.restore_file(fe, str(tmp_path / "out"), never_read, Codec(), cap=len(payload) - 1)
    with pytest.raises(archive.IntegrityError, match="allowed"):
        archive.verify_file(fe, never_read, Codec(), cap=len(payload) - 1)
    with pytest.raises(archive.IntegrityError, match="allowed"):
        store.restore_file(written.entry, REL, str(tmp_path / "out"), cap=len(payload) - 1)
    assert not (tmp_path / "out").exists()
    store.restore_file(written.entry, REL, str(tmp_path / "out"), cap=len(payload))
    assert (tmp_path / "out").read_bytes() == payload


def test_a_restore_never_writes_over_an_existing_file(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    written = checkpoint(store, tmp_path, b"payload")
    (tmp_path / "there").write_bytes(b"mine")
    with pytest.raises(FileExistsError):
        store.restore_file(written.entry, REL, str(tmp_path / "there"))
    assert (tmp_path / "there").read_bytes() == b"mine"
    with pytest.raises(archive.IntegrityError, match="not in the checkpoint"):
        store.restore_file(written.entry, "images/other.img", str(tmp_path / "out"))


# -- store keys -----------------------------------------------------------------------------------


def test_keyed_round_trip_seals_chunks_in_the_keys_space(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"), keys=ring_of("k1"))
    payload = b"".join(b"secret page %08d\n" % i for i in range(30_000))
    written = checkpoint(store, tmp_path, payload)
    assert written.entry.manifest is not None
    space = written.entry.manifest.space
    assert re.fullmatch(r"k-[0-9a-f]{24}", space) and os.listdir(chunks_dir(store)) == [space]
    at = 0
    for c in written.file.chunks:
        raw = payload[at : at + c.raw]
        at += c.raw
        assert c.digest != blake3.blake3(raw).hexdigest(), "a keyed name says nothing about the bytes"
        stored = chunk_path(store, space, c.digest).read_bytes()
        assert len(stored) == c.stored and b"secret page" not in stored
    store.restore_file(written.entry, REL, str(tmp_path / "out"))
    assert (tmp_path / "out").read_bytes() == payload
    assert store.verify(written.entry) == []
    _flip(chunk_path(store, space, written.file.chunks[1].digest), tmp_path)
    with pytest.raises(archive.IntegrityError, match="authenticate"):
        store.restore_file(written.entry, REL, str(tmp_path / "out2"))
    assert not (tmp_path / "out2").exists()
    assert store.verify(written.entry)


def test_the_same_payload_under_two_keys_and_none_shares_no_chunk(tmp_path: Path) -> None:
    root = str(tmp_path / "s")
    payload = distinct_chunks(3)
    # The same key name, other key material: names and spaces follow the key, not its name.
    stores = [Store(root, keys=ring_of("k1")), Store(root, keys=ring_of("k1")), Store(root)]
    written = [checkpoint(s, tmp_path, payload, ident=Identity("ns", f"web-{i}", "app")) for i, s in enumerate(stores)]
    spaces = [w.entry.manifest.space for w in written if w.entry.manifest is not None]
    assert len(set(spaces)) == 3 and spaces[2] == "plain"
    names = [{c.digest for c in w.file.chunks} for w in written]
    assert not names[0] & names[1] and not names[0] & names[2] and not names[1] & names[2]
    assert all(w.raw_new == len(payload) for w in written), "nothing shared across keys"
    assert sorted(os.listdir(chunks_dir(stores[0]))) == sorted(spaces)
    for i, (s, w) in enumerate(zip(stores, written, strict=True)):
        s.restore_file(w.entry, REL, str(tmp_path / f"out{i}"))
        assert (tmp_path / f"out{i}").read_bytes() == payload


# -- writing: direct and buffered, full disks -----------------------------------------------------


def _refusing_direct(monkeypatch: pytest.MonkeyPatch, refuse: bool) -> list[str]:
    """Record O_DIRECT opens; with `refuse`, act as a filesystem without O_DIRECT, which
    creates the file and then says EINVAL."""
    real_open, tried = os.open, []

    def fake_open(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if flags & os.O_DIRECT:
            tried.append(str(path))
            if refuse:
                os.close(real_open(path, flags & ~os.O_DIRECT, mode, dir_fd=dir_fd))
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", fake_open)
    return tried


@pytest.mark.parametrize("direct", [True, False])
def test_direct_and_buffered_writes_store_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    tried = _refusing_direct(monkeypatch, refuse=not direct)
    store = Store(str(tmp_path / "s"))
    # A chunk larger than the direct-I/O staging buffer (8 MiB), and not a whole number of blocks.
    big = (8 << 20) + 5000
    payload = os.urandom(big) + os.urandom(3000)
    written = checkpoint(store, tmp_path, payload, chunk=big)
    assert tried, "O_DIRECT was asked for"
    for c in written.file.chunks:
        path = chunk_path(store, "plain", c.digest)
        assert path.stat().st_size == c.stored, "the padding of the last direct block is cut off"
        assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert not [n for n in chunk_files(store) if "/." in n], "no temporary file left"
    assert store.verify(written.entry) == []
    store.restore_file(written.entry, REL, str(tmp_path / "out"))
    assert (tmp_path / "out").read_bytes() == payload


@pytest.mark.parametrize("direct", [True, False])
def test_a_full_disk_fails_the_file_leaves_no_temporary_chunk_and_the_next_try_fills_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    _refusing_direct(monkeypatch, refuse=not direct)
    store = Store(str(tmp_path / "s"))
    payload = os.urandom(8 * SMALL)
    src = tmp_path / "raw"
    src.write_bytes(payload)
    real_write, written, lock = os.write, [0], threading.Lock()

    def write(fd: int, data: Any) -> int:
        # Only chunk files being written run out of space: the disk fills during put.
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".tmp-"):
            with lock:
                if written[0] + len(data) > 3 * SMALL + 1000:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                written[0] += len(data)
        return real_write(fd, data)

    _cid, staging = store.new_staging()
    writer = store.chunk_writer(staging)
    with monkeypatch.context() as full:
        full.setattr(os, "write", write)
        # Not a BufferError from tearing down the staging buffer: the caller logs this one.
        with pytest.raises(OSError) as failure:
            store_file(writer, src, REL, chunk=SMALL)
    writer.close()
    store.discard(staging)
    assert failure.value.errno == errno.ENOSPC
    left = chunk_files(store)
    assert not [n for n in left if os.path.basename(n).startswith(".")], "no temporary file left behind"
    assert 0 < len(left) < 8
    for name in left:  # a chunk's name only ever holds the whole chunk
        digest = os.path.basename(name)
        Codec().decode_into(digest, (chunks_dir(store) / name).read_bytes(), memoryview(bytearray(SMALL)))
    again = checkpoint(store, tmp_path, payload)
    assert again.raw_new == (8 - len(left)) * SMALL and again.shared_bytes == sum(s for s, _, _ in left.values())
    assert len(chunk_files(store)) == 8
    store.restore_file(again.entry, REL, str(tmp_path / "out"))
    assert (tmp_path / "out").read_bytes() == payload
