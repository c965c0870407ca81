"""Stored files: compressed into independent, hashed zstd frames, and read back verified.

A file is stored as a sequence of zstd frames, one per chunk of the raw file (see
`compress`), so both compression and decompression spread over every core. The manifest
keeps a sha256 of every chunk (and, as the file's digest, one over those); a restore checks
each chunk's hash before its bytes are used, and any mismatch, truncation or bad frame fails
the file. Everything a stored file's manifest entry says is checked before a byte is read,
and nothing is ever written beyond the sizes it declares.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import hashlib
import mmap
import os
import stat
import threading
from collections.abc import Callable, Iterator

import zstandard

from hotrestart.errors import StoreError
from hotrestart.store import compress
from hotrestart.store.compress import CHUNK, LEVEL, ChunkSeal, FileCompressor
from hotrestart.store.manifest import MAX_CHUNK_RAW, MAX_CHUNK_STORED, Chunk, FileEntry, chunk_root
from hotrestart.store.seal import SealError


class IntegrityError(StoreError):
    """A stored file does not match its manifest entry."""


# (chunk index, sealed frame, output) -> plain length: opened into a buffer each thread
# reuses, since a fresh multi-megabyte result costs more in page faults than the cipher.
ChunkOpen = Callable[[int, bytes, memoryview], int]


def compress_file(
    src: str,
    dst: str,
    rel: str,
    *,
    level: int = LEVEL,
    chunk: int = CHUNK,
    direct: bool = True,
    seal: ChunkSeal | None = None,
) -> FileEntry:
    """Compress `src` into `dst` (durable on return); `rel` is the entry's path in the manifest."""
    stored = FileCompressor(src, dst, rel, chunk=chunk, level=level, direct=direct, seal=seal)
    try:
        with concurrent.futures.ThreadPoolExecutor(compress.workers()) as pool:
            stored.advance(pool, final=True)
        return stored.finish()
    finally:
        stored.close()


def _stored_bytes(src_fd: int, c: Chunk, stored_at: int, rel: str, *, hashed: bool = True) -> bytes:
    """One frame, read (not mapped: on a shared store another node could truncate the file,
    and a mapping would turn that into SIGBUS) and checked against its sha256.

    A sealed frame skips the hash (`hashed` false): its AEAD tag, bound to the checkpoint's
    key and the chunk's position, is checked instead and proves more."""
    frame = os.pread(src_fd, c.stored, stored_at)
    if len(frame) != c.stored or (hashed and hashlib.sha256(frame).hexdigest() != c.sha256):
        raise IntegrityError(f"{rel}: stored bytes do not match the manifest (sha256 of a chunk)")
    return frame


def _decompress_into(frame: bytes | memoryview, out: memoryview, rel: str) -> None:
    """Decompress a verified frame into `out`, which must come out exactly full.

    `out` is the chunk's declared raw size: readinto cannot write past it, and one byte
    more is asked for only to tell an overlong frame, never stored. zstd's window is capped
    too, so a frame cannot make the decompressor itself allocate more than a chunk."""
    done = 0
    try:
        with zstandard.ZstdDecompressor(max_window_size=MAX_CHUNK_RAW).stream_reader(frame) as reader:
            while done < len(out):
                with out[done:] as rest:
                    n = reader.readinto(rest)
                if not n:
                    break
                done += n
            if done == len(out) and reader.read(1):
                raise IntegrityError(f"{rel}: a chunk decompressed to more than {len(out)} bytes")
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"{rel}: not valid zstd data: {exc}") from exc
    if done != len(out):
        raise IntegrityError(f"{rel}: a chunk decompressed to {done} bytes, not {len(out)}")


_scratch = threading.local()


@contextlib.contextmanager
def _opened(frame: bytes, unseal: ChunkOpen | None, index: int, rel: str) -> Iterator[bytes | memoryview]:
    """The plain frame: `frame` itself, or opened into this thread's scratch buffer (valid
    until the context ends; bytes that do not authenticate never leave it)."""
    if unseal is None:
        yield frame
        return
    buf: bytearray | None = getattr(_scratch, "buf", None)
    if buf is None or len(buf) < len(frame):
        buf = _scratch.buf = bytearray(max(len(frame), CHUNK + (CHUNK >> 4)))
    with memoryview(buf) as whole:
        try:
            n = unseal(index, frame, whole)
        except SealError as exc:
            raise IntegrityError(f"{rel}: {exc}") from None
        with whole[:n] as plain:
            yield plain


def _restore_chunk(
    src_fd: int,
    target: mmap.mmap,
    c: Chunk,
    stored_at: int,
    raw_at: int,
    rel: str,
    unseal: ChunkOpen | None = None,
    index: int = 0,
) -> None:
    """Verify one frame and decompress it straight into its place in the mapped output."""
    stored = _stored_bytes(src_fd, c, stored_at, rel, hashed=unseal is None)
    with (
        _opened(stored, unseal, index, rel) as frame,
        memoryview(target) as whole,
        whole[raw_at : raw_at + c.raw] as out,
    ):
        _decompress_into(frame, out, rel)


def check_entry(entry: FileEntry, stored_size: int, cap: int | None = None) -> None:
    """What a restore and `hotrestart verify` demand of a file before reading a byte of it:
    chunks listed, sizes that add up, a chunk list that matches the file's digest, no chunk
    larger than the store writes, and no more raw bytes than `cap` allows."""
    if stored_size != entry.stored_bytes:
        raise IntegrityError(f"{entry.path}: {stored_size} bytes stored, the manifest says {entry.stored_bytes}")
    if not entry.chunks:
        raise IntegrityError(f"{entry.path}: the manifest lists no chunks")
    if chunk_root(entry.chunks) != entry.sha256 or sum(c.stored for c in entry.chunks) != stored_size:
        raise IntegrityError(f"{entry.path}: the manifest's chunk list does not match the file's digest")
    if entry.raw_bytes != sum(c.raw for c in entry.chunks) or entry.raw_bytes <= 0:
        raise IntegrityError(f"{entry.path}: the manifest's sizes do not add up")
    if any(not 0 < c.raw <= MAX_CHUNK_RAW or not 0 < c.stored <= MAX_CHUNK_STORED for c in entry.chunks):
        raise IntegrityError(f"{entry.path}: a chunk is larger than {MAX_CHUNK_RAW} bytes")
    if cap is not None and entry.raw_bytes > cap:
        raise IntegrityError(f"{entry.path}: {entry.raw_bytes} raw bytes, more than the {cap} allowed here")


def open_stored(src: str | int) -> int:
    """A read descriptor of a stored file given by path (not followed if a link) or by a
    descriptor the caller opened safely (duplicated); refused unless a regular file."""
    if isinstance(src, int):
        fd = os.dup(src)
    else:
        try:
            fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENXIO):
                raise IntegrityError(f"{src}: not a regular file") from None
            raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise IntegrityError(f"{src if isinstance(src, str) else 'stored file'}: not a regular file")
    return fd


def decompress_file(
    src: str | int, dst: str, entry: FileEntry, *, cap: int | None = None, unseal: ChunkOpen | None = None
) -> None:
    """Decompress `src` into `dst`, verifying `entry`'s hashes and sizes; removes `dst` on failure.

    `src` is a path or a descriptor opened by the caller (`Store.open_member`); `cap` is the
    most raw bytes the caller allows (the container's memory, the work area's free space):
    a file declaring more is refused before anything is written."""
    try:
        src_fd = open_stored(src)
        try:
            check_entry(entry, os.fstat(src_fd).st_size, cap)
            fd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, entry.raw_bytes)
                target = mmap.mmap(fd, entry.raw_bytes)
            finally:
                os.close(fd)
            try:
                if len(entry.chunks) == 1:  # most of CRIU's images: no pool to start and stop
                    _restore_chunk(src_fd, target, entry.chunks[0], 0, 0, entry.path, unseal, 0)
                    return
                with concurrent.futures.ThreadPoolExecutor(min(compress.workers(), len(entry.chunks))) as pool:
                    futures = []
                    stored_at = raw_at = 0
                    for i, c in enumerate(entry.chunks):
                        futures.append(
                            pool.submit(_restore_chunk, src_fd, target, c, stored_at, raw_at, entry.path, unseal, i)
                        )
                        stored_at += c.stored
                        raw_at += c.raw
                    for future in futures:
                        future.result()
            finally:
                target.close()
        finally:
            os.close(src_fd)
    except BaseException:
        _remove(dst)
        raise


def verify_file(src: str | int, entry: FileEntry, *, cap: int | None = None, unseal: ChunkOpen | None = None) -> None:
    """Check a stored file as a restore would (the same checks, every chunk's sha256, every
    frame decompressed to its declared size) without writing it anywhere."""
    src_fd = open_stored(src)
    try:
        check_entry(entry, os.fstat(src_fd).st_size, cap)
        scratch = bytearray(max(c.raw for c in entry.chunks))
        stored_at = 0
        with memoryview(scratch) as whole:
            for i, c in enumerate(entry.chunks):
                stored = _stored_bytes(src_fd, c, stored_at, entry.path)
                with _opened(stored, unseal, i, entry.path) as frame, whole[: c.raw] as out:
                    _decompress_into(frame, out, entry.path)
                stored_at += c.stored
    finally:
        os.close(src_fd)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
