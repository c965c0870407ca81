"""Stored files read back: every chunk fetched, checked and decompressed into place in parallel.

Everything a file's manifest entry says is checked before a byte is read (`check_entry`),
nothing is ever written beyond the sizes it declares, and every chunk is checked against
its name before its bytes are used (`chunkcodec`): any mismatch, truncation or bad frame
fails the file, and a failed file leaves nothing behind.
"""

from __future__ import annotations

import concurrent.futures
import mmap
import os
from collections.abc import Callable

from hotrestart.store.chunkcodec import Codec, CorruptChunk, IntegrityError
from hotrestart.store.chunkwrite import workers
from hotrestart.store.manifest import MAX_CHUNK_RAW, MAX_CHUNK_STORED, Chunk, FileEntry, chunk_root

__all__ = ["CorruptChunk", "IntegrityError", "check_entry", "restore_file", "verify_file"]

# (digest, stored size) -> the chunk's stored bytes, exactly that many, or IntegrityError
ReadChunk = Callable[[str, int], bytes]


def check_entry(entry: FileEntry, cap: int | None = None) -> None:
    """What a restore and `hotrestart verify` demand of a file before reading a byte of it:
    sizes that add up, a chunk list that matches the file's digest, no chunk larger than
    the store writes, and no more raw bytes than `cap` allows."""
    if chunk_root(entry.chunks) != entry.digest:
        raise IntegrityError(f"{entry.path}: the manifest's chunk list does not match the file's digest")
    if entry.raw_bytes != sum(c.raw for c in entry.chunks) or entry.stored_bytes != sum(c.stored for c in entry.chunks):
        raise IntegrityError(f"{entry.path}: the manifest's sizes do not add up")
    if any(not 0 < c.raw <= MAX_CHUNK_RAW or not 0 < c.stored <= MAX_CHUNK_STORED for c in entry.chunks):
        raise IntegrityError(f"{entry.path}: a chunk is larger than {MAX_CHUNK_RAW} bytes")
    if cap is not None and entry.raw_bytes > cap:
        raise IntegrityError(f"{entry.path}: {entry.raw_bytes} raw bytes, more than the {cap} allowed here")


def _restore_chunk(read: ReadChunk, codec: Codec, c: Chunk, target: mmap.mmap, at: int, rel: str) -> None:
    stored = read(c.digest, c.stored)
    with memoryview(target) as whole, whole[at : at + c.raw] as out:
        try:
            codec.decode_into(c.digest, stored, out)
        except CorruptChunk as exc:
            raise CorruptChunk(c.digest, f"{rel}: {exc}") from None
        except IntegrityError as exc:
            raise IntegrityError(f"{rel}: {exc}") from None


def restore_file(entry: FileEntry, dst: str, read: ReadChunk, codec: Codec, *, cap: int | None = None) -> None:
    """Write the file `entry` to the new local file `dst`, every chunk verified on the way;
    `cap` is the most raw bytes the caller allows (the container's memory, the work area's
    free space). Removes `dst` on failure."""
    check_entry(entry, cap)
    fd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            if not entry.raw_bytes:
                return
            os.ftruncate(fd, entry.raw_bytes)
            target = mmap.mmap(fd, entry.raw_bytes)
        finally:
            os.close(fd)
        try:
            if len(entry.chunks) == 1:  # most of CRIU's images: no pool to start and stop
                _restore_chunk(read, codec, entry.chunks[0], target, 0, entry.path)
                return
            with concurrent.futures.ThreadPoolExecutor(min(workers(), len(entry.chunks))) as pool:
                futures = []
                at = 0
                for c in entry.chunks:
                    futures.append(pool.submit(_restore_chunk, read, codec, c, target, at, entry.path))
                    at += c.raw
                for future in futures:
                    future.result()
        finally:
            target.close()
    except BaseException:
        _remove(dst)
        raise


def verify_file(entry: FileEntry, read: ReadChunk, codec: Codec, *, cap: int | None = None) -> None:
    """Check a stored file as a restore would, writing it nowhere."""
    check_entry(entry, cap)
    scratch = bytearray(max((c.raw for c in entry.chunks), default=0))
    with memoryview(scratch) as whole:
        for c in entry.chunks:
            with whole[: c.raw] as out:
                try:
                    codec.decode_into(c.digest, read(c.digest, c.stored), out)
                except CorruptChunk as exc:
                    raise CorruptChunk(c.digest, f"{entry.path}: {exc}") from None
                except IntegrityError as exc:
                    raise IntegrityError(f"{entry.path}: {exc}") from None


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
