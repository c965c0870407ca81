"""Compressed, hashed files: zstandard streaming both ways, sha256 over the stored bytes.

Compression runs with several worker threads inside zstd (released GIL), and the hash is
computed on the compressed stream as it is written, so a file is read and written once.
Decompression verifies the hash as it goes and raises before the caller uses the output.
"""

from __future__ import annotations

import hashlib
import os
from typing import BinaryIO

import zstandard

from hotrestart.store.manifest import FileEntry

CHUNK = 4 << 20


class IntegrityError(Exception):
    """A stored file does not match its manifest entry."""


class _HashingWriter:
    """File-like sink that hashes and counts what passes through."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.hash = hashlib.sha256()
        self.count = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.count += len(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()


def compress_file(src: str, dst: str, rel: str, *, level: int = 1, threads: int = 0) -> FileEntry:
    """Compress `src` into `dst` (fsynced); `rel` is the entry's path in the manifest."""
    threads = threads or min(os.cpu_count() or 1, 8)
    cctx = zstandard.ZstdCompressor(level=level, threads=threads if threads > 1 else 0)
    with open(src, "rb") as fin, open(dst, "wb", opener=_private) as fout:
        sink = _HashingWriter(fout)
        raw, _written = cctx.copy_stream(fin, sink, read_size=CHUNK, write_size=CHUNK)  # type: ignore[arg-type]
        fout.flush()
        os.fsync(fout.fileno())
    return FileEntry(path=rel, sha256=sink.hash.hexdigest(), stored_bytes=sink.count, raw_bytes=raw)


def decompress_file(src: str, dst: str, entry: FileEntry) -> None:
    """Decompress `src` into `dst`, verifying `entry`'s hash and sizes; removes `dst` on failure."""
    digest = hashlib.sha256()
    stored = 0
    dctx = zstandard.ZstdDecompressor()
    try:
        with open(src, "rb") as fin, open(dst, "wb", opener=_private) as fout:
            obj = dctx.decompressobj()
            written = 0
            while chunk := fin.read(CHUNK):
                digest.update(chunk)
                stored += len(chunk)
                out = obj.decompress(chunk)
                written += len(out)
                fout.write(out)
            if stored != entry.stored_bytes or digest.hexdigest() != entry.sha256:
                raise IntegrityError(f"{entry.path}: stored bytes do not match the manifest (sha256 or size)")
            if not obj.eof or written != entry.raw_bytes:
                raise IntegrityError(f"{entry.path}: truncated or oversized ({written} of {entry.raw_bytes} bytes)")
    except zstandard.ZstdError as exc:
        _remove(dst)
        raise IntegrityError(f"{entry.path}: not valid zstd data: {exc}") from exc
    except BaseException:
        _remove(dst)
        raise


def verify_file(src: str, entry: FileEntry) -> None:
    digest = hashlib.sha256()
    stored = 0
    with open(src, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            stored += len(chunk)
    if stored != entry.stored_bytes or digest.hexdigest() != entry.sha256:
        raise IntegrityError(f"{entry.path}: stored bytes do not match the manifest")


def _private(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_CLOEXEC, 0o600)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
