"""A dump's request and its result, as they pass from dumping to publishing."""

from __future__ import annotations

import dataclasses
import functools
import threading

from hotrestart.errors import CheckpointError
from hotrestart.store import compress, follow
from hotrestart.store.manifest import FileEntry, Manifest
from hotrestart.store.seal import Sealer


@dataclasses.dataclass(frozen=True)
class DumpRequest:
    """Why and how to dump: a stop ends the container; API and periodic checkpoints leave it
    running. TCP connections and file locks are dumped by default so that any checkpoint can
    serve as a restore point (the restore closes connections unless the address is kept)."""

    reason: str  # stop, api, periodic
    leave_running: bool
    tcp_established: bool = True
    file_locks: bool = True
    ext_unix_sk: bool = False
    empty_ns: tuple[str, ...] = ()
    cgroups_mode: str = ""


class Seals:
    """Seals the chunks of one checkpoint being written. A file's position in the manifest
    is part of each of its chunks' nonces, so positions are handed out as files are first
    seen (the page images while CRIU still writes them) and the manifest lists files in
    that order."""

    def __init__(self, sealer: Sealer) -> None:
        self.sealer = sealer
        self._index: dict[str, int] = {}
        self._lock = threading.Lock()

    def file(self, rel: str) -> compress.ChunkSeal:
        with self._lock:
            index = self._index.setdefault(rel, len(self._index))
        return functools.partial(self.sealer.seal_chunk, index)

    def ordered(self, entries: list[FileEntry]) -> list[FileEntry]:
        ordered = sorted(entries, key=lambda e: self._index.get(e.path, -1))
        if [self._index.get(e.path) for e in ordered] != list(range(len(ordered))):
            raise CheckpointError("sealed files do not match the checkpoint's file list")
        return ordered


@dataclasses.dataclass
class Dumped:
    """A dumped container waiting to be compressed and published."""

    id: str
    staging: str
    work: str
    tmpfs: bool
    files: list[tuple[str, str]]  # (raw file, path in the checkpoint)
    manifest: Manifest
    started: float
    images: str  # the raw CRIU images, until published
    early: follow.Follower | None = None  # compressing the page images since the dump began
    seals: Seals | None = None  # with a store key
