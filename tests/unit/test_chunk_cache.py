"""The node-local chunk cache of an object store, and reads that fetch a chunk from the store
again when the copy they were given is wrong."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from hotrestart.store import archive, chunkcache
from hotrestart.store.chunkcache import ChunkCache
from hotrestart.store.chunkcodec import Codec
from hotrestart.store.manifest import Chunk, FileEntry, chunk_root

SPACE = "plain"


def _chunk(codec: Codec, raw: bytes) -> tuple[str, bytes]:
    digest = codec.digest(raw)
    return digest, codec.encode(digest, raw)


def _copy(cache: ChunkCache, digest: str) -> Path:
    return Path(cache.root, "v1", "chunks", SPACE, digest[:2], digest)


def test_a_copy_is_served_as_written_and_only_at_its_size(tmp_path: Path) -> None:
    cache = ChunkCache(str(tmp_path / "c"), 1 << 30)
    digest, stored = _chunk(Codec(), os.urandom(10_000))
    assert cache.get(SPACE, digest, len(stored)) is None
    cache.put(SPACE, digest, stored)
    assert cache.get(SPACE, digest, len(stored)) == stored
    assert cache.get(SPACE, digest, len(stored) + 1) is None  # not what the manifest says: a miss
    assert _copy(cache, digest).stat().st_mode & 0o777 == 0o600
    assert os.stat(cache.root).st_mode & 0o777 == 0o700
    cache.drop(SPACE, digest)
    assert cache.get(SPACE, digest, len(stored)) is None


def test_copies_kept_behind_are_written_by_the_cache_and_bounded_while_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = ChunkCache(str(tmp_path / "c"), 1 << 30)
    codec = Codec(level=1)
    kept = [_chunk(codec, os.urandom(50_000)) for _ in range(20)]
    for digest, stored in kept:
        cache.keep(SPACE, digest, stored)
    assert cache.flush(10)
    assert all(cache.get(SPACE, d, len(s)) == s for d, s in kept)
    # Nothing more waits than PENDING_MAX: past it, a copy is not kept at all.
    monkeypatch.setattr(chunkcache, "PENDING_MAX", 0)
    digest, stored = _chunk(codec, b"late" * 1000)
    cache.keep(SPACE, digest, stored)
    assert cache.flush(10) and cache.get(SPACE, digest, len(stored)) is None


def test_the_writing_thread_ends_when_idle_and_comes_back_for_the_next_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chunkcache, "WRITER_IDLE", 0.05)
    cache = ChunkCache(str(tmp_path / "c"), 1 << 30)
    codec = Codec(level=1)
    for _ in range(3):
        digest, stored = _chunk(codec, os.urandom(20_000))
        cache.keep(SPACE, digest, stored)
        writer = cache._writer
        assert writer is not None
        assert cache.flush(10) and cache.get(SPACE, digest, len(stored)) == stored
        writer.join(5)
        assert not writer.is_alive() and cache._writer is None


def test_a_copy_dropped_while_it_is_being_written_is_not_left_behind(tmp_path: Path) -> None:
    # A restore proves a chunk corrupt and drops it while the writer is putting the same bytes
    # (fetched a moment before) on disk: the drop waits for that write, then removes it.
    cache = ChunkCache(str(tmp_path / "c"), 1 << 30)
    digest, stored = _chunk(Codec(level=1), os.urandom(20_000))
    writing, release = threading.Event(), threading.Event()
    real_put = cache._chunks.put

    def slow_put(space: str, digest: str, data: bytes) -> None:
        writing.set()
        assert release.wait(10)
        real_put(space, digest, data)

    cache._chunks.put = slow_put  # type: ignore[method-assign]
    cache.keep(SPACE, digest, stored)
    assert writing.wait(10)
    dropper = threading.Thread(target=cache.drop, args=(SPACE, digest))
    dropper.start()
    dropper.join(0.2)
    assert dropper.is_alive(), "the drop waits for the write under way"
    release.set()
    dropper.join(10)
    assert cache.flush(10)
    assert not _copy(cache, digest).exists() and cache.get(SPACE, digest, len(stored)) is None


def test_what_is_not_a_plain_copy_is_a_miss(tmp_path: Path) -> None:
    cache = ChunkCache(str(tmp_path / "c"), 1 << 30)
    digest, stored = _chunk(Codec(), os.urandom(5000))
    cache.put(SPACE, digest, stored)
    copy = _copy(cache, digest)
    secret = tmp_path / "secret"
    secret.write_bytes(stored)
    copy.unlink()
    copy.symlink_to(secret)
    assert cache.get(SPACE, digest, len(stored)) is None
    assert cache.get("../x", digest, len(stored)) is None
    assert cache.get(SPACE, "../../etc/passwd", 10) is None
    cache.put(SPACE, digest, stored)  # a copy written again replaces the link
    assert not copy.is_symlink() and cache.get(SPACE, digest, len(stored)) == stored


def test_the_copies_used_longest_ago_go_first_past_the_cap(tmp_path: Path) -> None:
    cache = ChunkCache(str(tmp_path / "c"), 5 * 4096)
    codec = Codec(level=1)
    names = []
    for i in range(5):
        digest, _ = _chunk(codec, bytes([i]) * 100)
        cache.put(SPACE, digest, os.urandom(4096))
        os.utime(_copy(cache, digest), (1000 + i, 1000 + i))
        names.append(digest)
    assert all(_copy(cache, d).exists() for d in names)
    # Reading the oldest marks it used: it is kept, the next oldest goes.
    assert cache.get(SPACE, names[0], 4096) is not None
    stray = _copy(cache, names[0]).parent / ".tmp-dead"
    stray.write_bytes(b"x")
    os.utime(stray, (1, 1))
    digest, _ = _chunk(codec, b"new" * 100)
    cache.put(SPACE, digest, os.urandom(4096))
    cache.trim()
    kept = {d for d in [*names, digest] if _copy(cache, d).exists()}
    assert names[0] in kept and digest in kept and names[1] not in kept
    assert sum(_copy(cache, d).stat().st_size for d in kept) <= cache.cap
    assert not stray.exists(), "a dead writer's temporary file is removed"


def test_the_environment_turns_the_cache_off_or_sizes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(chunkcache.DIR_ENV, str(tmp_path / "c"))
    monkeypatch.setenv(chunkcache.BYTES_ENV, "0")
    assert chunkcache.from_env() is None
    monkeypatch.setenv(chunkcache.BYTES_ENV, "12345")
    cache = chunkcache.from_env()
    assert cache is not None and cache.cap == 12345 and cache.root == str(tmp_path / "c")
    monkeypatch.delenv(chunkcache.BYTES_ENV)
    cache = chunkcache.from_env()
    assert cache is not None and cache.cap == chunkcache.DEFAULT_BYTES
    monkeypatch.setenv(chunkcache.BYTES_ENV, "8G")
    with pytest.raises(ValueError, match="not a number of bytes"):
        chunkcache.configured()
    assert chunkcache.from_env() is None, "the store works on without it"


def test_doctor_says_what_the_cache_holds_or_why_there_is_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hotrestart.doctor import _chunk_cache_check

    cache = ChunkCache(str(tmp_path / "c"), 1 << 30)
    digest, stored = _chunk(Codec(), os.urandom(3 << 20))
    cache.put(SPACE, digest, stored)
    check = _chunk_cache_check(cache)
    assert check.ok and check.detail == f"{cache.root}: 3 MiB held, at most 1024 MiB", check
    monkeypatch.setenv(chunkcache.BYTES_ENV, "0")
    check = _chunk_cache_check(None)
    assert check.ok and check.detail.startswith("off")
    monkeypatch.setenv(chunkcache.BYTES_ENV, "lots")
    check = _chunk_cache_check(None)
    assert not check.ok and "not a number" in check.detail and chunkcache.BYTES_ENV in check.fix


def _file(codec: Codec, parts: list[bytes]) -> tuple[FileEntry, dict[str, bytes]]:
    chunks, stored = [], {}
    for raw in parts:
        digest, data = _chunk(codec, raw)
        stored[digest] = data
        chunks.append(Chunk(stored=len(data), raw=len(raw), digest=digest))
    raw_bytes = sum(len(p) for p in parts)
    entry = FileEntry("images/pages-1.img", chunk_root(chunks), sum(c.stored for c in chunks), raw_bytes, chunks)
    return entry, stored


def test_a_wrong_copy_is_fetched_again_from_the_store(tmp_path: Path) -> None:
    codec = Codec()
    parts = [os.urandom(70_000) for _ in range(4)]
    entry, stored = _file(codec, parts)
    bad = entry.chunks[2].digest
    fetched: list[str] = []

    def copy(digest: str, size: int) -> bytes:
        return os.urandom(size) if digest == bad else stored[digest]

    def origin(digest: str, size: int) -> bytes:
        fetched.append(digest)
        return stored[digest]

    dst = tmp_path / "out"
    archive.restore_file(entry, str(dst), copy, codec, again=origin)
    assert dst.read_bytes() == b"".join(parts) and fetched == [bad]
    reader = archive.FileReader(entry, copy, codec, again=origin)
    try:
        assert bytes(reader.read(140_000, 70_000)) == parts[2]
    finally:
        reader.close()

    # Wrong in the store too: the file fails, and says which chunk.
    def wrong(digest: str, size: int) -> bytes:
        return codec.encode(digest, os.urandom(70_000)) if digest == bad else stored[digest]

    with pytest.raises(archive.CorruptChunk) as caught:
        archive.restore_file(entry, str(tmp_path / "out2"), wrong, codec, again=wrong)
    assert caught.value.digest == bad and not (tmp_path / "out2").exists()
    with pytest.raises(archive.IntegrityError):  # and with nowhere to fetch it again
        archive.restore_file(entry, str(tmp_path / "out3"), copy, codec)


def test_a_put_that_cannot_write_is_no_error(tmp_path: Path) -> None:
    cache = ChunkCache(str(tmp_path / "c"), 1 << 30)
    digest, stored = _chunk(Codec(), b"x" * 4096)
    (Path(cache.root) / "v1").write_text("not a folder")
    cache.put(SPACE, digest, stored)
    assert cache.get(SPACE, digest, len(stored)) is None
