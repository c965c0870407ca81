"""A node-local cache of an object store's chunks, so that a checkpoint restored on the node
that wrote it (a container restarted in place, a periodic checkpoint then a stop) is read
from the node's disk instead of the network.

Chunks are kept as stored (compressed; sealed under a store key), in the directory store's
layout (`chunks`), shared by every object store this node uses: a chunk's name is its
content under its key space, and every copy read from here is checked against the
manifest like a chunk read from anywhere (`chunkcodec`). A copy found wrong is fetched
from the bucket again (`StoredFiles`' origin), so the cache can lose or spoil a chunk but
never serve one. Copies are written behind, by a thread of the cache's own (an upload or a
download never waits for the node's disk), as the directory store writes chunks (direct
I/O: no page cache filled, measured twice as fast here as buffered writes), and their
folders are never synced: a copy a crash loses is fetched again.

Bounded: `HOTRESTART_S3_CACHE_BYTES` (default 8 GiB, 0 turns the cache off; checked each
time an eighth of it has been written), and never past what leaves a tenth of its filesystem
free; the copies used longest ago go first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time

from hotrestart.store.chunkcodec import IntegrityError
from hotrestart.store.chunks import Chunks
from hotrestart.store.safefs import UnsafeEntryError
from hotrestart.store.tree import Tree

log = logging.getLogger(__name__)

DEFAULT_DIR = "/var/lib/hotrestart/s3-cache"
DIR_ENV = "HOTRESTART_S3_CACHE"
BYTES_ENV = "HOTRESTART_S3_CACHE_BYTES"
DEFAULT_BYTES = 8 << 30
TOUCH_AFTER = 600.0  # a copy read is marked recently used at most this often (one utime)
STRAY_AGE = 3600.0  # a temporary file untouched this long is a dead writer's
PENDING_MAX = 256 << 20  # copies waiting for the disk; past this, a copy is not kept
WRITER_IDLE = 30.0  # the writing thread ends after this long without work (`keep` starts another)


class ChunkCache:
    def __init__(self, root: str, cap: int) -> None:
        os.makedirs(root, mode=0o700, exist_ok=True)
        self.root = root
        self.cap = cap
        self._chunks = Chunks(Tree(root))
        self._lock = threading.Lock()
        self._added = cap  # trim on the first put: other processes share the folder
        self._queue: queue.SimpleQueue[tuple[int, str, str, bytes]] = queue.SimpleQueue()
        self._pending = 0
        self._seq = 0  # copies handed to `keep`, numbered
        self._dropped: dict[tuple[str, str], int] = {}  # chunk -> `_seq` when dropped
        self._idle = threading.Condition(self._lock)
        self._writer: threading.Thread | None = None
        # Held by the writer from its look at `_dropped` until the copy is on disk, and by
        # `drop`: a copy proven corrupt is never written back after its removal. Taken before
        # `_lock` when both are held.
        self._writing = threading.Lock()

    def get(self, space: str, digest: str, size: int) -> bytes | None:
        """The cached copy of a chunk stored as `size` bytes, or None."""
        try:
            data = self._chunks.read(space, digest, size)
        except (IntegrityError, UnsafeEntryError, OSError):
            return None
        with contextlib.suppress(OSError), self._chunks.folder(space, digest) as fd:
            if time.time() - os.stat(digest, dir_fd=fd, follow_symlinks=False).st_mtime > TOUCH_AFTER:
                os.utime(digest, dir_fd=fd, follow_symlinks=False)
        return data

    def keep(self, space: str, digest: str, data: bytes) -> None:
        """Have a copy written by the cache's own thread: an upload or a download never waits
        for the node's disk (a stop's checkpoint is durable when the bucket has it). Past
        PENDING_MAX bytes waiting, the copy is not kept."""
        with self._lock:
            if self._pending + len(data) > PENDING_MAX:
                return
            self._pending += len(data)
            self._seq += 1
            seq = self._seq
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_behind, name="chunk-cache", daemon=True)
                self._writer.start()
            # Under the lock: the writer decides to end under it too, never with a copy queued.
            self._queue.put((seq, space, digest, data))

    def flush(self, timeout: float) -> bool:
        """Wait until every copy handed to `keep` is written; False if still some at `timeout`."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def _write_behind(self) -> None:
        while True:
            try:
                seq, space, digest, data = self._queue.get(timeout=WRITER_IDLE)
            except queue.Empty:
                with self._lock:
                    if self._queue.empty():
                        self._writer = None
                        return
                continue
            try:
                with self._writing:
                    with self._lock:
                        # Dropped since it was handed over (proven corrupt): not written back.
                        stale = self._dropped.get((space, digest), 0) >= seq
                    if not stale:
                        self.put(space, digest, data)
            except Exception:  # never let the thread die: copies would pile up unwritten
                log.exception("chunk %s not cached", digest[:16])
            finally:
                with self._idle:
                    self._pending -= len(data)
                    self._idle.notify_all()

    def put(self, space: str, digest: str, data: bytes) -> None:
        """Keep a copy of a chunk (replacing one there); best effort, errors logged."""
        try:
            self._chunks.put(space, digest, data)
        except (OSError, UnsafeEntryError) as exc:
            log.info("chunk %s not cached: %s", digest[:16], exc)
            return
        with self._lock:
            self._added += len(data)
            due = self._added > self.cap // 8
            if due:
                self._added = 0
        if due:
            self.trim()

    def held(self) -> int:
        """The bytes the cache holds now."""
        return sum(c[2] for c in self._chunks.listing())

    def drop(self, space: str, digest: str) -> None:
        """Remove a copy proven corrupt, and any copy of it still waiting to be written."""
        with self._writing:
            with self._lock:
                self._dropped[(space, digest)] = self._seq
            self._remove(space, digest)

    def _remove(self, space: str, digest: str) -> None:
        with contextlib.suppress(OSError, UnsafeEntryError):
            self._chunks.discard(space, digest)

    def trim(self) -> int:
        """Remove the copies used longest ago until the cache fits; the bytes removed."""
        try:
            copies = sorted(self._chunks.listing(), key=lambda c: c[3])
            self._chunks.remove_strays(time.time() - STRAY_AGE)
            fs = os.statvfs(self.root)
        except (OSError, UnsafeEntryError) as exc:
            log.info("chunk cache %s not trimmed: %s", self.root, exc)
            return 0
        held = sum(c[2] for c in copies)
        free = fs.f_bavail * fs.f_frsize
        room = min(self.cap, held + free - fs.f_blocks * fs.f_frsize // 10)
        removed = 0
        for space, digest, size, _ in copies:
            if held - removed <= room:
                break
            self._remove(space, digest)
            removed += size
        return removed


def configured() -> tuple[str, int]:
    """(the cache's folder, its cap in bytes; 0 when off) as the environment sets them;
    ValueError for a cap that is not a number."""
    raw = os.environ.get(BYTES_ENV, "").strip()
    try:
        cap = int(raw) if raw else DEFAULT_BYTES
    except ValueError:
        raise ValueError(f"{BYTES_ENV}={raw!r}: not a number of bytes") from None
    return os.environ.get(DIR_ENV, "") or DEFAULT_DIR, max(cap, 0)


def from_env() -> ChunkCache | None:
    """The node's chunk cache as the environment sets it (None when off or misconfigured:
    the store works without it, and `hotrestart doctor` says why)."""
    try:
        root, cap = configured()
        return ChunkCache(root, cap) if cap else None
    except (ValueError, OSError) as exc:
        log.warning("no chunk cache: %s", exc)
        return None
