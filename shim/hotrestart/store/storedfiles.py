"""A checkpoint's stored files read back, the same for every backend: each backend supplies
how to fetch a chunk's stored bytes and how to drop a chunk proven corrupt, and where it
reads copies (a node-local cache), how to fetch a chunk from the store itself."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from hotrestart.store import archive
from hotrestart.store.chunkcodec import Codec
from hotrestart.store.entry import Entry
from hotrestart.store.manifest import FileEntry
from hotrestart.store.seal import SealError
from hotrestart.store.sealing import Sealing

ChunkReader = Callable[[str], archive.ReadChunk]  # space -> how to fetch its chunks
Discard = Callable[[str, str], None]  # (space, digest): remove a chunk proven corrupt


class StoredFiles:
    def __init__(
        self, sealing: Sealing, reader: ChunkReader, discard: Discard, threads: int, origin: ChunkReader | None = None
    ) -> None:
        self._sealing = sealing
        self._reader = reader
        self._origin = origin  # the store itself, where `reader` may serve a copy
        self._discard_chunk = discard
        self._threads = threads

    def _again(self, space: str) -> archive.ReadChunk | None:
        return self._origin(space) if self._origin is not None else None

    def restore_file(self, entry: Entry, rel: str, dst: str, *, cap: int | None = None) -> None:
        """Write one file of `entry` to `dst` as a restore does, every chunk verified (see archive)."""
        stored, codec = self._stored(entry, rel)
        try:
            read, again = self._reader(codec.space), self._again(codec.space)
            archive.restore_file(stored, dst, read, codec, cap=cap, threads=self._threads, again=again)
        except archive.CorruptChunk as exc:
            # Shared: left in place, it would spoil every later checkpoint holding those bytes.
            self._discard(codec.space, exc.digest)
            raise

    def file_reader(self, entry: Entry, rel: str, *, ahead: int = 0) -> archive.FileReader:
        """Random reads of one file of `entry`, every chunk verified (for lazy restores); a
        chunk found corrupt is removed from the store, as `restore_file` does."""
        stored, codec = self._stored(entry, rel)
        return archive.FileReader(
            stored,
            self._reader(codec.space),
            codec,
            on_corrupt=lambda d: self._discard(codec.space, d),
            ahead=ahead or self._threads,
            again=self._again(codec.space),
        )

    def verify(self, entry: Entry) -> list[str]:
        """`hotrestart verify`: the restore's checks on every file; the problems found."""
        if entry.manifest is None:
            return [entry.problem or "manifest missing or unreadable"]
        try:
            codec = self._sealing.reading(entry)
        except (archive.IntegrityError, SealError) as exc:
            return [str(exc)]
        problems = []
        read = (self._origin or self._reader)(codec.space)  # what the store holds, not a copy
        for fe in entry.manifest.files:
            try:
                archive.verify_file(fe, read, codec)
            except (archive.IntegrityError, OSError) as exc:
                problems.append(str(exc))
        return problems

    def _stored(self, entry: Entry, rel: str) -> tuple[FileEntry, Codec]:
        """The manifest's entry for the file `rel` of `entry`, and how its chunks are opened."""
        files = [f for f in (entry.manifest.files if entry.manifest else []) if f.path == rel]
        if not files:
            raise archive.IntegrityError(f"{rel}: not in the checkpoint's manifest")
        try:
            return files[0], self._sealing.reading(entry)
        except SealError as exc:
            raise archive.IntegrityError(str(exc)) from None

    def _discard(self, space: str, digest: str) -> None:
        with contextlib.suppress(OSError):
            self._discard_chunk(space, digest)
