"""Compressed checkpoint files: chunked round trips, integrity, direct and buffered writes, the follower, full disks."""

from __future__ import annotations

import dataclasses
import errno
import os
import time
from pathlib import Path

import pytest
from storekit import IDENT, make_checkpoint

from hotrestart.store import archive, compress, follow
from hotrestart.store.manifest import chunk_root
from hotrestart.store.store import Store


def test_roundtrip_and_any_flipped_byte_is_refused(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    payload = os.urandom(100_000) + b"\0" * 100_000
    make_checkpoint(store, tmp_path, payload)
    entry = store.latest(IDENT)
    assert entry is not None and entry.manifest is not None
    fe = entry.manifest.files[0]
    stored = os.path.join(entry.path, fe.path)
    archive.decompress_file(stored, str(tmp_path / "out"), fe)
    assert (tmp_path / "out").read_bytes() == payload
    data = bytearray(Path(stored).read_bytes())
    data[len(data) // 3] ^= 0x40
    Path(stored).write_bytes(bytes(data))
    with pytest.raises(archive.IntegrityError):
        archive.decompress_file(stored, str(tmp_path / "out2"), fe)
    assert not (tmp_path / "out2").exists(), "nothing of a bad file is left for a restore to use"


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    make_checkpoint(store, tmp_path, os.urandom(50_000))
    entry = store.latest(IDENT)
    assert entry is not None and entry.manifest is not None
    fe = entry.manifest.files[0]
    stored = os.path.join(entry.path, fe.path)
    Path(stored).write_bytes(Path(stored).read_bytes()[:-100])
    with pytest.raises(archive.IntegrityError):
        archive.decompress_file(stored, str(tmp_path / "out"), fe)


def test_many_chunks_roundtrip_in_parallel(tmp_path: Path) -> None:
    payload = b"".join(os.urandom(2048) + b"\0" * 2048 for _ in range(100)) + b"tail"
    src = tmp_path / "raw"
    src.write_bytes(payload)
    entry = archive.compress_file(str(src), str(tmp_path / "z"), "z", chunk=10_000)
    assert len(entry.chunks) == -(-len(payload) // 10_000)
    assert entry.stored_bytes < len(payload) * 0.6
    archive.decompress_file(str(tmp_path / "z"), str(tmp_path / "out"), entry)
    assert (tmp_path / "out").read_bytes() == payload
    archive.verify_file(str(tmp_path / "z"), entry)


@pytest.mark.parametrize("direct", [True, False])
def test_direct_and_buffered_writes_store_the_same_bytes(tmp_path: Path, direct: bool) -> None:
    # Larger than the direct-I/O staging buffer, and not a whole number of blocks.
    payload = b"".join(os.urandom(3000) + b"\0" * 1096 for _ in range(2600)) + b"odd tail"
    src = tmp_path / "raw"
    src.write_bytes(payload)
    entry = archive.compress_file(str(src), str(tmp_path / "z"), "z", chunk=1 << 20, direct=direct)
    stored = (tmp_path / "z").read_bytes()
    assert len(stored) == entry.stored_bytes, "the padding of the last direct block is cut off"
    assert oct((tmp_path / "z").stat().st_mode & 0o777) == "0o600"
    archive.verify_file(str(tmp_path / "z"), entry)
    archive.decompress_file(str(tmp_path / "z"), str(tmp_path / "out"), entry)
    assert (tmp_path / "out").read_bytes() == payload


def test_a_chunk_list_that_does_not_match_the_file_digest_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "raw"
    src.write_bytes(os.urandom(30_000))
    entry = archive.compress_file(str(src), str(tmp_path / "z"), "z", chunk=10_000)
    assert entry.sha256 == chunk_root(entry.chunks)
    swapped = dataclasses.replace(entry, chunks=[entry.chunks[1], entry.chunks[0], *entry.chunks[2:]])
    with pytest.raises(archive.IntegrityError, match="digest"):
        archive.decompress_file(str(tmp_path / "z"), str(tmp_path / "out"), swapped)
    lying = dataclasses.replace(entry, raw_bytes=entry.raw_bytes + 1)
    with pytest.raises(archive.IntegrityError, match="sizes"):
        archive.decompress_file(str(tmp_path / "z"), str(tmp_path / "out"), lying)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cores", [2, 4])
def test_follower_compresses_a_file_while_it_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cores: int
) -> None:
    monkeypatch.setattr(compress, "workers", lambda: cores)  # 2: inline; 4: a pool of 3
    images, dest = tmp_path / "images", tmp_path / "staging"
    dest.mkdir()
    follower = follow.Follower(str(images), str(dest), "images/", chunk=64 << 10)
    follower.start()
    images.mkdir()
    payload = b"".join(os.urandom(1000) + b"\0" * 3096 for _ in range(100)) + b"tail"
    with open(images / "pages-1.img", "wb", buffering=0) as f:
        for at in range(0, len(payload), 50_000):
            f.write(payload[at : at + 50_000])
            time.sleep(follow.Follower.POLL * 2)
        deadline = time.monotonic() + 5
        while follower._files["pages-1.img"].offset < len(payload) // (64 << 10) * (64 << 10):
            assert time.monotonic() < deadline, "whole chunks are compressed while the file grows"
            time.sleep(0.01)
    (images / "core-1.img").write_bytes(b"not followed")
    entries = follower.finish()
    assert list(entries) == [str(images / "pages-1.img")]
    entry = entries[str(images / "pages-1.img")]
    assert entry.path == "images/pages-1.img.zst" and entry.raw_bytes == len(payload)
    archive.decompress_file(str(dest / "pages-1.img.zst"), str(tmp_path / "out"), entry)
    assert (tmp_path / "out").read_bytes() == payload


def test_follower_close_stops_it_without_a_result(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "pages-1.img").write_bytes(os.urandom(10_000))
    follower = follow.Follower(str(tmp_path / "images"), str(tmp_path), "images/", chunk=4096)
    follower.start()
    time.sleep(follow.Follower.POLL * 3)
    follower.close()
    follower.close()
    assert not follower._thread.is_alive()


@pytest.mark.parametrize("direct", [True, False])
def test_a_full_disk_fails_the_file_with_its_own_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    src = tmp_path / "raw"
    src.write_bytes(os.urandom(3 << 20))
    real_write, written = os.write, [0]

    def write(fd: int, data: bytes) -> int:
        if written[0] + len(data) > 1 << 20:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = real_write(fd, data)
        written[0] += n
        return n

    monkeypatch.setattr(os, "write", write)
    # Not a BufferError from tearing down the staging buffer: the caller logs this one.
    with pytest.raises(OSError) as failure:
        archive.compress_file(str(src), str(tmp_path / "z"), "z", chunk=256 << 10, direct=direct)
    assert failure.value.errno == errno.ENOSPC
