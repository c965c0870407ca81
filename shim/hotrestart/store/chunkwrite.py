"""Writing a checkpoint's files into the store as shared chunks: only new ones cost anything.

Each file is cut (`chunking`) and every piece hashed on the worker threads (BLAKE3 and zstd
release the GIL); a chunk the store already holds, from this container's previous
checkpoint or from any other, is only recorded, and only the rest is compressed, sealed
and written. So a checkpoint costs what changed since any checkpoint in the store, not
what the container holds. Chunks are journalled before they are looked for, for the
collector's sake (`chunkgc`); new ones are durable, with their folders, before `finish`
returns, so a manifest published after it refers to nothing that can be lost.
"""

from __future__ import annotations

import concurrent.futures
import mmap
import os
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from typing import Protocol

from hotrestart.store.chunkcodec import Codec
from hotrestart.store.chunking import Cutter, Span
from hotrestart.store.manifest import MAX_CHUNK_RAW, Chunk, FileEntry, chunk_root


class ChunkSink(Protocol):
    """Where a backend keeps chunks (`chunks.Chunks` in a folder tree, `objectstore` in a bucket)."""

    def stored_size(self, space: str, digest: str) -> int | None: ...
    def put(self, space: str, digest: str, data: bytes) -> None: ...
    def sync(self, space: str, fans: set[str]) -> None: ...
    def renew(self) -> None: ...


class RefJournal(Protocol):
    """What a writer records of the chunks it uses before looking for them (see chunkgc)."""

    def add(self, space: str, digest: str) -> None: ...
    def close(self) -> None: ...


def workers() -> int:
    """Threads for hashing, compressing or restoring chunks: every core, at most eight."""
    return max(1, min(os.cpu_count() or 1, 8))


class ChunkWriter:
    """The chunks of one checkpoint being written; files may be stored from one thread at a time."""

    def __init__(self, chunks: ChunkSink, codec: Codec, journal: RefJournal, threads: int = 0) -> None:
        self._chunks = chunks
        self._codec = codec
        self._journal = journal
        self.threads = threads or workers()  # the pool the caller gives `store_file` should have as many
        self._lock = threading.Lock()
        self._known: dict[str, int] = {}  # digest -> stored size, of chunks this checkpoint uses
        self._writing: dict[str, threading.Event] = {}  # digests being looked for or written now
        self._failed: dict[str, BaseException] = {}  # why a digest could not be written
        self._fans: set[str] = set()
        self.new_bytes = 0  # stored bytes of the chunks written
        self.written: set[str] = set()  # their digests
        self.shared_bytes = 0  # stored bytes of chunks found in the store (or earlier in this checkpoint)
        self.raw_new = 0  # raw bytes of the chunks written

    def store_file(
        self,
        src: str,
        rel: str,
        spans: list[Span] | Cutter,
        pool: concurrent.futures.Executor,
        stored: Mapping[Span, Chunk] | None = None,
    ) -> FileEntry:
        """Store the file `src` as the manifest entry `rel`, cut at `spans` (or where the
        cutter, given its bytes, says). `stored`: spans of it this writer stored already
        (`store_spans`, while the file was written), with their chunks."""
        fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if not callable(spans) and sum(n for _, n in spans) != size:
                raise ValueError(f"{rel}: the chunks do not cover the file")
            chunks: list[Chunk] = []
            if size:
                source = mmap.mmap(fd, size, prot=mmap.PROT_READ)
                try:
                    with memoryview(source) as data:
                        cut = spans(data) if callable(spans) else spans
                        chunks = self.store_spans(source, _covering(cut, size, rel), pool, stored or {})
                finally:
                    source.close()
        finally:
            os.close(fd)
        return FileEntry(
            path=rel,
            digest=chunk_root(chunks),
            stored_bytes=sum(c.stored for c in chunks),
            raw_bytes=size,
            chunks=chunks,
        )

    def store_spans(
        self,
        source: mmap.mmap,
        spans: Iterable[Span],
        pool: concurrent.futures.Executor,
        stored: Mapping[Span, Chunk] | None = None,
    ) -> list[Chunk]:
        """The chunks of `source` at `spans`, stored on `pool` (those in `stored` are not
        read again); `source` may be closed once this returns."""
        window = 2 * self.threads  # bounds the frames held in memory at once
        pending: deque[concurrent.futures.Future[Chunk]] = deque()
        out: list[Chunk] = []
        try:
            for start, length in spans:
                known = (stored or {}).get((start, length))
                if known is not None:
                    done: concurrent.futures.Future[Chunk] = concurrent.futures.Future()
                    done.set_result(known)
                    pending.append(done)
                    continue
                pending.append(pool.submit(self._store_one, source, start, length))
                if len(pending) > window:
                    out.append(pending.popleft().result())
            while pending:
                out.append(pending.popleft().result())
        finally:
            # The mapping is closed after this returns: no worker may still be reading it.
            concurrent.futures.wait(list(pending))
        return out

    def _store_one(self, source: mmap.mmap, start: int, length: int) -> Chunk:
        codec = self._codec
        with memoryview(source) as whole, whole[start : start + length] as raw:
            digest = codec.digest(raw)
            with self._lock:
                known = self._known.get(digest)
                writing = self._writing.get(digest) if known is None else None
                if known is None and writing is None:
                    self._writing[digest] = threading.Event()
            if writing is not None:  # the same bytes earlier in this checkpoint, being written now
                writing.wait()
                with self._lock:
                    known = self._known.get(digest)
                if known is None:
                    raise self._failed.get(digest) or OSError(f"chunk {digest[:16]} could not be written")
            if known is not None:
                with self._lock:
                    self.shared_bytes += known
                return Chunk(stored=known, raw=length, digest=digest)
            try:
                stored = self._write(digest, raw)
            except BaseException as exc:
                with self._lock:
                    self._failed[digest] = exc
                raise
            finally:
                with self._lock:
                    self._writing.pop(digest).set()
        return Chunk(stored=stored, raw=length, digest=digest)

    def _write(self, digest: str, raw: memoryview) -> int:
        """Store one chunk unless the store has it; its stored size."""
        codec = self._codec
        # Journalled before it is looked for: see chunkgc.
        self._journal.add(codec.space, digest)
        stored = self._chunks.stored_size(codec.space, digest)
        if stored is not None:
            with self._lock:
                self._known[digest] = stored
                self.shared_bytes += stored
            return stored
        data = codec.encode(digest, raw)
        self._chunks.put(codec.space, digest, data)
        with self._lock:
            self._known[digest] = len(data)
            self._fans.add(digest[:2])
            self.written.add(digest)
            self.new_bytes += len(data)
            self.raw_new += len(raw)
        return len(data)

    def pin(self, space: str, digest: str) -> None:
        """Record a chunk this checkpoint is about to read (its parent's pages), so that no
        collection removes it meanwhile (see chunkgc)."""
        self._journal.add(space, digest)

    def keepalive(self) -> None:
        """Tell the store this writer is still at work (a bucket's writer holds a lease that
        lapses when neither `put` nor this renews it)."""
        self._chunks.renew()

    @property
    def space(self) -> str:
        return self._codec.space

    def finish(self) -> None:
        """Make the new chunks' names durable."""
        if self._fans:
            self._chunks.sync(self._codec.space, self._fans)

    def close(self) -> None:
        self._journal.close()


def _covering(spans: Iterable[Span], size: int, rel: str) -> Iterator[Span]:
    """`spans`, checked as they come to follow one another without gaps and to end with the
    file: a cutter's spans are known only as the file is read."""
    at = 0
    for start, length in spans:
        if start != at or not 0 < length <= MAX_CHUNK_RAW or start + length > size:
            raise ValueError(f"{rel}: the chunks do not cover the file in pieces the store takes")
        at += length
        yield start, length
    if at != size:
        raise ValueError(f"{rel}: the chunks do not cover the file")
