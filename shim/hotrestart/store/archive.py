"""Stored files read back: every chunk fetched, checked and decompressed into place in parallel.

Everything a file's manifest entry says is checked before a byte is read (`check_entry`),
nothing is ever written beyond the sizes it declares, and every chunk is checked against
its name before its bytes are used (`chunkcodec`): any mismatch, truncation or bad frame
fails the file, and a failed file leaves nothing behind.
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import mmap
import os
import threading
from collections.abc import Callable

from hotrestart.store.chunkcodec import Codec, CorruptChunk, IntegrityError
from hotrestart.store.chunkwrite import workers
from hotrestart.store.manifest import MAX_CHUNK_RAW, MAX_CHUNK_STORED, Chunk, FileEntry, chunk_root

__all__ = ["CorruptChunk", "FileReader", "IntegrityError", "check_entry", "restore_file", "verify_file"]

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


def _decode(read: ReadChunk, again: ReadChunk | None, codec: Codec, c: Chunk, out: memoryview, rel: str) -> None:
    """Check and decompress one chunk into `out`. `again`: where to fetch it once more when
    the bytes `read` gave are wrong (`read` served a copy, `again` asks the store)."""
    try:
        try:
            codec.decode_into(c.digest, read(c.digest, c.stored), out)
        except IntegrityError:
            if again is None:
                raise
            codec.decode_into(c.digest, again(c.digest, c.stored), out)
    except CorruptChunk as exc:
        raise CorruptChunk(c.digest, f"{rel}: {exc}") from None
    except IntegrityError as exc:
        raise IntegrityError(f"{rel}: {exc}") from None


def _restore_chunk(
    read: ReadChunk, again: ReadChunk | None, codec: Codec, c: Chunk, target: mmap.mmap, at: int, rel: str
) -> None:
    with memoryview(target) as whole, whole[at : at + c.raw] as out:
        _decode(read, again, codec, c, out, rel)


def restore_file(
    entry: FileEntry,
    dst: str,
    read: ReadChunk,
    codec: Codec,
    *,
    cap: int | None = None,
    threads: int = 0,
    again: ReadChunk | None = None,
) -> None:
    """Write the file `entry` to the new local file `dst`, every chunk verified on the way;
    `cap` is the most raw bytes the caller allows (the container's memory, the work area's
    free space); `again` as for `_decode`. Removes `dst` on failure."""
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
                _restore_chunk(read, again, codec, entry.chunks[0], target, 0, entry.path)
                return
            with concurrent.futures.ThreadPoolExecutor(min(threads or workers(), len(entry.chunks))) as pool:
                futures = []
                at = 0
                for c in entry.chunks:
                    futures.append(pool.submit(_restore_chunk, read, again, codec, c, target, at, entry.path))
                    at += c.raw
                try:
                    for future in futures:
                        future.result()
                except BaseException:
                    # One chunk failed the file: the rest are not fetched (a store out of
                    # reach would otherwise time every one of them out in turn).
                    for future in futures:
                        future.cancel()
                    raise
        finally:
            target.close()
    except BaseException:
        _remove(dst)
        raise


class FileReader:
    """Random reads of one stored file, for a page source serving a process's memory on
    demand: each chunk is fetched, checked and decompressed once, the next ones ahead of
    time in a small pool (pages are asked for mostly in order), and at most `keep` chunks
    are held (a few MiB each), so serving a large file takes little memory."""

    def __init__(
        self,
        entry: FileEntry,
        read: ReadChunk,
        codec: Codec,
        *,
        on_corrupt: Callable[[str], None] = lambda digest: None,
        ahead: int = 0,
        keep: int = 16,
        again: ReadChunk | None = None,
    ) -> None:
        check_entry(entry)
        self.entry = entry
        self._on_corrupt = on_corrupt
        self._read = read
        self._again = again
        self._codec = codec
        self._starts = []
        at = 0
        for c in entry.chunks:
            self._starts.append(at)
            at += c.raw
        self._ahead = ahead if ahead else workers()
        self._keep = max(keep, self._ahead + 2)
        self._pool = concurrent.futures.ThreadPoolExecutor(self._ahead, thread_name_prefix="page-read")
        self._lock = threading.Lock()
        self._chunks: collections.OrderedDict[int, concurrent.futures.Future[bytearray]] = collections.OrderedDict()
        self._last: tuple[int, bytearray] | None = None

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._chunks.clear()
        self._last = None

    def read(self, offset: int, length: int) -> bytes | memoryview:
        """`length` bytes of the file from `offset`, every chunk they come from verified;
        a view into the chunk (no copy) when they lie within one."""
        if offset < 0 or length < 0 or offset + length > self.entry.raw_bytes:
            raise IntegrityError(f"{self.entry.path}: read of {length} bytes at {offset} beyond the file")
        i = bisect.bisect_right(self._starts, offset) - 1
        skip = offset - self._starts[i]
        data = self._chunk(i)
        if skip + length <= len(data):
            return memoryview(data)[skip : skip + length]
        out = bytearray(data[skip:])
        while len(out) < length:
            i += 1
            out += memoryview(self._chunk(i))[: length - len(out)]
        return bytes(out)

    def _chunk(self, i: int) -> bytearray:
        last = self._last
        if last is not None and last[0] == i:
            return last[1]  # the daemon asks for a chunk's pages in many small pieces
        with self._lock:
            wanted = self._want(i)
            for j in range(i + 1, min(i + 1 + self._ahead, len(self.entry.chunks))):
                self._want(j)
            while len(self._chunks) > self._keep:
                self._chunks.popitem(last=False)
        data = wanted.result()
        self._last = (i, data)
        return data

    def _want(self, i: int) -> concurrent.futures.Future[bytearray]:
        future = self._chunks.get(i)
        if future is None:
            future = self._chunks[i] = self._pool.submit(self._decode, i)
        else:
            self._chunks.move_to_end(i)
        return future

    def _decode(self, i: int) -> bytearray:
        c = self.entry.chunks[i]
        out = bytearray(c.raw)
        with memoryview(out) as view:
            try:
                _decode(self._read, self._again, self._codec, c, view, self.entry.path)
            except CorruptChunk:
                self._on_corrupt(c.digest)
                raise
        return out


def verify_file(entry: FileEntry, read: ReadChunk, codec: Codec, *, cap: int | None = None) -> None:
    """Check a stored file as a restore would, writing it nowhere."""
    check_entry(entry, cap)
    scratch = bytearray(max((c.raw for c in entry.chunks), default=0))
    with memoryview(scratch) as whole:
        for c in entry.chunks:
            with whole[: c.raw] as out:
                _decode(read, None, codec, c, out, entry.path)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
