"""Compressed, hashed files: independent zstd frames, compressed and restored in parallel.

A file is stored as a sequence of zstd frames, one per chunk of the raw file, so both
compression and decompression spread over every core (zstd releases the GIL). The manifest
keeps a sha256 of every chunk (and, as the file's digest, one over those); a restore checks
each chunk's hash before its bytes are used, and any mismatch, truncation or bad frame fails
the file.

Writing is sized for memory holding gigabytes: the raw file is mapped rather than read
(no copy, no buffers to allocate), and the stored file bypasses the page cache where the
filesystem allows it (see `_Output`).
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
from collections import deque
from collections.abc import Callable, Iterator

import zstandard

from hotrestart.errors import StoreError
from hotrestart.store.manifest import MAX_CHUNK_RAW, MAX_CHUNK_STORED, Chunk, FileEntry, chunk_root
from hotrestart.store.seal import SealError

# Small enough that glibc reuses the frame buffers instead of mapping fresh memory for
# each (its mmap threshold tops out at 32 MiB), large enough for zstd's window.
CHUNK = 8 << 20
_ALIGN = 4096  # O_DIRECT wants block-aligned addresses, offsets and lengths
_STAGE = 8 << 20
LEVEL = -1  # zstd's fast mode: memory pages compress about as well as at level 3, twice as fast


class IntegrityError(StoreError):
    """A stored file does not match its manifest entry."""


def _workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


_local = threading.local()


# With a store key, each compressed frame is sealed (seal.py) before it is stored and
# hashed: (chunk index, frame) -> stored bytes, and back on restore.
ChunkSeal = Callable[[int, bytes], bytes]
# (chunk index, sealed frame, output) -> plain length: opened into a buffer each thread
# reuses, since a fresh multi-megabyte result costs more in page faults than the cipher.
ChunkOpen = Callable[[int, bytes, memoryview], int]


def _compress(
    source: mmap.mmap, start: int, length: int, level: int, seal: ChunkSeal | None = None, index: int = 0
) -> tuple[bytes, str]:
    cctx = getattr(_local, "cctx", None)
    if cctx is None or getattr(_local, "level", None) != level:
        cctx = _local.cctx = zstandard.ZstdCompressor(level=level)
        _local.level = level
    with memoryview(source) as whole, whole[start : start + length] as data:
        frame = cctx.compress(data)
    if seal is not None:
        frame = seal(index, frame)
    return frame, hashlib.sha256(frame).hexdigest()


class _Output:
    """A stored file being written, with O_DIRECT where the filesystem takes it.

    Through the page cache, a checkpoint costs a copy into freshly allocated cache pages,
    pushes out the node's useful cache, and is durable only after fsync writes it all
    again; direct writes go to the device once. Blocks must be aligned, so bytes gather in
    a page-aligned buffer, the last block goes out padded and the file is then cut to its
    length. Filesystems without O_DIRECT get ordinary writes.
    """

    def __init__(self, path: str, *, direct: bool = True) -> None:
        # O_NOFOLLOW: a link planted in a staging folder of a shared store is not written through.
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        self._buffer: mmap.mmap | None = None
        if direct:
            buffer = mmap.mmap(-1, _STAGE)  # first: a failure here must not leave a descriptor open
            try:
                self.fd = os.open(path, flags | os.O_DIRECT, 0o600)
                self._buffer = buffer
            except OSError as exc:
                buffer.close()
                if exc.errno != errno.EINVAL:
                    raise
        if self._buffer is None:
            self.fd = os.open(path, flags, 0o600)
        self._filled = 0
        self.size = 0

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self._buffer is None:
            with memoryview(data) as whole:
                _write_all(self.fd, whole)
            return
        view = memoryview(data)
        while view:
            n = min(len(view), _STAGE - self._filled)
            self._buffer[self._filled : self._filled + n] = view[:n]
            self._filled += n
            view = view[n:]
            if self._filled == _STAGE:
                self._flush(_STAGE)

    def _flush(self, length: int) -> None:
        assert self._buffer is not None
        with memoryview(self._buffer) as staged, staged[:length] as chunk:
            _write_all(self.fd, chunk)
        self._filled = 0

    def finish(self) -> None:
        """Write what is left and make the file durable."""
        if self._buffer is not None and self._filled:
            padded = -(-self._filled // _ALIGN) * _ALIGN
            self._buffer[self._filled : padded] = bytes(padded - self._filled)
            self._flush(padded)
            os.ftruncate(self.fd, self.size)
        os.fsync(self.fd)

    def close(self) -> None:
        if self._buffer is not None:
            self._buffer.close()
        os.close(self.fd)


def _write_all(fd: int, view: memoryview) -> None:
    # Each slice is released even when the write fails (a full disk): a slice left alive in
    # the traceback would keep the staging buffer's mapping from being closed.
    done = 0
    while done < len(view):
        with view[done:] as rest:
            done += os.write(fd, rest)


class _Stored:
    """One file being compressed: its raw source, its stored output and the chunks so far."""

    def __init__(
        self, src: str, dst: str, rel: str, *, chunk: int, level: int, direct: bool, seal: ChunkSeal | None = None
    ) -> None:
        self.rel = rel
        self.seal = seal
        self.chunk = chunk
        self.level = level
        self.offset = 0  # raw bytes compressed so far; always a whole number of chunks until the end
        self.chunks: list[Chunk] = []
        self._fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._out = _Output(dst, direct=direct)
        except BaseException:
            os.close(self._fd)
            raise

    def advance(self, pool: concurrent.futures.Executor | None, *, final: bool) -> None:
        """Compress the whole chunks written so far, and with `final` the rest too.

        With no pool the chunks are compressed in the calling thread, one at a time."""
        size = os.fstat(self._fd).st_size
        end = size if final else self.offset + (size - self.offset) // self.chunk * self.chunk
        if end <= self.offset:
            return
        base = self.offset  # a multiple of the chunk size, so of the page size: mmap takes it
        source = mmap.mmap(self._fd, end - base, prot=mmap.PROT_READ, offset=base)
        try:
            spans = [(at - base, min(self.chunk, end - at)) for at in range(base, end, self.chunk)]
            if pool is None:
                for start, length in spans:
                    self._append(length, _compress(source, start, length, self.level, self.seal, len(self.chunks)))
            else:
                self._in_parallel(pool, source, spans)
        finally:
            source.close()
        self.offset = end

    def _in_parallel(self, pool: concurrent.futures.Executor, source: mmap.mmap, spans: list[tuple[int, int]]) -> None:
        window = 2 * _workers()  # bounds the frames held in memory
        pending: deque[tuple[int, concurrent.futures.Future[tuple[bytes, str]]]] = deque()
        first = len(self.chunks)  # every earlier chunk is appended before this call
        try:
            for i, (start, length) in enumerate(spans):
                work = pool.submit(_compress, source, start, length, self.level, self.seal, first + i)
                pending.append((length, work))
                if len(pending) > window:
                    length, future = pending.popleft()
                    self._append(length, future.result())
            while pending:
                length, future = pending.popleft()
                self._append(length, future.result())
        finally:
            # The mapping is closed after this returns: no worker may still be reading it.
            concurrent.futures.wait([f for _, f in pending])

    def _append(self, raw_len: int, result: tuple[bytes, str]) -> None:
        frame, digest = result
        self._out.write(frame)
        self.chunks.append(Chunk(stored=len(frame), raw=raw_len, sha256=digest))

    def finish(self) -> FileEntry:
        self._out.finish()
        return FileEntry(
            path=self.rel,
            sha256=chunk_root(self.chunks),
            stored_bytes=sum(c.stored for c in self.chunks),
            raw_bytes=sum(c.raw for c in self.chunks),
            chunks=self.chunks,
        )

    def close(self) -> None:
        self._out.close()
        os.close(self._fd)


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
    stored = _Stored(src, dst, rel, chunk=chunk, level=level, direct=direct, seal=seal)
    try:
        with concurrent.futures.ThreadPoolExecutor(_workers()) as pool:
            stored.advance(pool, final=True)
        return stored.finish()
    finally:
        stored.close()


class Follower:
    """Compresses files while another process is still appending to them.

    CRIU writes a stop-time dump's memory (`pages-*.img`) front to back into the work
    folder; compressing each chunk as soon as it is complete, on a core CRIU does not use,
    leaves only the last chunk and the small images for after the dump, which is most of
    the time from stop to a durable checkpoint. Only for files that are never rewritten
    behind their end: CRIU's page images are, as long as it dumps without a parent image
    (no pre-dump, no --auto-dedup).
    """

    POLL = 0.02

    def __init__(
        self,
        directory: str,
        dest: str,
        rel_prefix: str,
        *,
        prefix: str = "pages-",
        suffix: str = ".img",
        chunk: int = CHUNK,
        level: int = LEVEL,
        direct: bool = True,
        seal_for: Callable[[str], ChunkSeal] | None = None,
    ) -> None:
        self._dir = directory
        self._dest = dest
        self._rel_prefix = rel_prefix
        self._match = (prefix, suffix)
        self._chunk, self._level, self._direct = chunk, level, direct
        self._seal_for = seal_for  # a file's chunk sealer, asked for when the file is first seen
        self._files: dict[str, _Stored] = {}
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="hotrestart-follow", daemon=True)
        self._closed = False

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        # Every core but one (CRIU's); on a two-core node that is this thread alone.
        spare = _workers() - 1
        try:
            with concurrent.futures.ThreadPoolExecutor(spare) if spare > 1 else contextlib.nullcontext() as pool:
                while not self._stop.wait(self.POLL):
                    self._step(pool, final=False)
        except BaseException as exc:
            self._error = exc

    def _step(self, pool: concurrent.futures.Executor | None, *, final: bool) -> None:
        try:
            names = sorted(os.listdir(self._dir))
        except FileNotFoundError:
            return  # not created yet
        prefix, suffix = self._match
        for name in names:
            if not (name.startswith(prefix) and name.endswith(suffix)):
                continue
            stored = self._files.get(name)
            if stored is None:
                dst = os.path.join(self._dest, name + ".zst")
                stored = self._files[name] = _Stored(
                    os.path.join(self._dir, name),
                    dst,
                    self._rel_prefix + name + ".zst",
                    chunk=self._chunk,
                    level=self._level,
                    direct=self._direct,
                    seal=self._seal_for(self._rel_prefix + name + ".zst") if self._seal_for else None,
                )
            stored.advance(pool, final=final)

    def finish(self) -> dict[str, FileEntry]:
        """Once the writer is done: compress what is left; the entries by raw file path."""
        self._halt()
        try:
            if self._error is not None:
                raise self._error
            with concurrent.futures.ThreadPoolExecutor(_workers()) as pool:
                self._step(pool, final=True)
            return {os.path.join(self._dir, name): stored.finish() for name, stored in self._files.items()}
        finally:
            self.close()

    def _halt(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def close(self) -> None:
        """Stop following and release every descriptor (the outputs are left to the caller)."""
        self._halt()
        if not self._closed:
            self._closed = True
            for stored in self._files.values():
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
                with concurrent.futures.ThreadPoolExecutor(min(_workers(), len(entry.chunks))) as pool:
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
