"""Compressed, hashed files: independent zstd frames, compressed and restored in parallel.

A file is stored as a sequence of zstd frames, one per chunk of the raw file, so both
compression and decompression spread over every core (zstd releases the GIL). The manifest
keeps a sha256 of the whole stored file and of every chunk; a restore checks each chunk's
hash before its bytes are used, and any mismatch, truncation or bad frame fails the file.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import threading
from collections import deque

import zstandard

from hotrestart.store.manifest import Chunk, FileEntry

CHUNK = 32 << 20
LEVEL = -1  # zstd's fast mode: memory pages compress about as well as at level 3, twice as fast


class IntegrityError(Exception):
    """A stored file does not match its manifest entry."""


def _workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


_local = threading.local()


def _compress(data: bytes, level: int) -> tuple[bytes, str]:
    cctx = getattr(_local, "cctx", None)
    if cctx is None or getattr(_local, "level", None) != level:
        cctx = _local.cctx = zstandard.ZstdCompressor(level=level)
        _local.level = level
    frame = cctx.compress(data)
    return frame, hashlib.sha256(frame).hexdigest()


def compress_file(src: str, dst: str, rel: str, *, level: int = LEVEL, chunk: int = CHUNK) -> FileEntry:
    """Compress `src` into `dst` (fsynced); `rel` is the entry's path in the manifest."""
    whole = hashlib.sha256()
    chunks: list[Chunk] = []
    workers = _workers()
    with (
        open(src, "rb") as fin,
        open(dst, "wb", opener=_private) as fout,
        concurrent.futures.ThreadPoolExecutor(workers) as pool,
    ):
        pending: deque[tuple[int, concurrent.futures.Future[tuple[bytes, str]]]] = deque()

        def write_one() -> None:
            raw_len, future = pending.popleft()
            frame, digest = future.result()
            whole.update(frame)
            fout.write(frame)
            chunks.append(Chunk(stored=len(frame), raw=raw_len, sha256=digest))

        while data := fin.read(chunk):
            pending.append((len(data), pool.submit(_compress, data, level)))
            if len(pending) > workers * 2:
                write_one()
        while pending:
            write_one()
        fout.flush()
        os.fsync(fout.fileno())
    return FileEntry(
        path=rel,
        sha256=whole.hexdigest(),
        stored_bytes=sum(c.stored for c in chunks),
        raw_bytes=sum(c.raw for c in chunks),
        chunks=chunks,
    )


def _restore_chunk(src: str, dst_fd: int, c: Chunk, stored_at: int, raw_at: int, rel: str) -> None:
    with open(src, "rb") as f:
        f.seek(stored_at)
        frame = f.read(c.stored)
    if len(frame) != c.stored or hashlib.sha256(frame).hexdigest() != c.sha256:
        raise IntegrityError(f"{rel}: stored bytes do not match the manifest (sha256 of a chunk)")
    try:
        raw = zstandard.ZstdDecompressor().decompress(frame, max_output_size=c.raw)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"{rel}: not valid zstd data: {exc}") from exc
    if len(raw) != c.raw:
        raise IntegrityError(f"{rel}: a chunk decompressed to {len(raw)} bytes, not {c.raw}")
    view = memoryview(raw)
    while view:
        view = view[os.pwrite(dst_fd, view, raw_at + c.raw - len(view)) :]


def decompress_file(src: str, dst: str, entry: FileEntry) -> None:
    """Decompress `src` into `dst`, verifying `entry`'s hashes and sizes; removes `dst` on failure."""
    try:
        size = os.stat(src).st_size
        if size != entry.stored_bytes:
            raise IntegrityError(f"{entry.path}: {size} bytes stored, the manifest says {entry.stored_bytes}")
        if not entry.chunks:
            raise IntegrityError(f"{entry.path}: the manifest lists no chunks")
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, entry.raw_bytes)
            with concurrent.futures.ThreadPoolExecutor(_workers()) as pool:
                futures = []
                stored_at = raw_at = 0
                for c in entry.chunks:
                    futures.append(pool.submit(_restore_chunk, src, fd, c, stored_at, raw_at, entry.path))
                    stored_at += c.stored
                    raw_at += c.raw
                for future in futures:
                    future.result()
        finally:
            os.close(fd)
    except BaseException:
        _remove(dst)
        raise


def verify_file(src: str, entry: FileEntry) -> None:
    digest = hashlib.sha256()
    stored = 0
    with open(src, "rb") as f:
        while data := f.read(CHUNK):
            digest.update(data)
            stored += len(data)
    if stored != entry.stored_bytes or digest.hexdigest() != entry.sha256:
        raise IntegrityError(f"{entry.path}: stored bytes do not match the manifest")


def _private(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_CLOEXEC, 0o600)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
