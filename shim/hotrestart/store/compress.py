"""One file compressed into independent, hashed zstd frames, one per chunk, in parallel.

Each chunk of the raw file becomes its own zstd frame, so compression spreads over every
core (zstd releases the GIL) and a restore can decompress the frames in parallel too. The
raw file is mapped rather than read (no copy, no buffers to allocate) and may still be
growing: whole chunks are compressed as they appear (`follow.Follower`), the rest once
the writer is done. With a store key each frame is sealed before it is stored and hashed.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import mmap
import os
import threading
from collections import deque
from collections.abc import Callable

import zstandard

from hotrestart.store.direct import DirectOutput
from hotrestart.store.manifest import Chunk, FileEntry, chunk_root

# Small enough that glibc reuses the frame buffers instead of mapping fresh memory for
# each (its mmap threshold tops out at 32 MiB), large enough for zstd's window.
CHUNK = 8 << 20
LEVEL = -1  # zstd's fast mode: memory pages compress about as well as at level 3, twice as fast

# With a store key, each compressed frame is sealed (seal.py) before it is stored and
# hashed: (chunk index, frame) -> stored bytes.
ChunkSeal = Callable[[int, bytes], bytes]


def workers() -> int:
    """Threads for compressing or restoring chunks: every core, at most eight."""
    return max(1, min(os.cpu_count() or 1, 8))


_local = threading.local()


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


class FileCompressor:
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
            self._out = DirectOutput(dst, direct=direct)
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
        window = 2 * workers()  # bounds the frames held in memory
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
