"""A dump's request and its result, as they pass from dumping to publishing."""

from __future__ import annotations

import dataclasses

from hotrestart.checkpoint.follow import Follower
from hotrestart.checkpoint.tracking import Link, Tracking
from hotrestart.store.chunkwrite import ChunkWriter
from hotrestart.store.manifest import Manifest
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
    sealer: Sealer | None = None  # signs the manifest, with a store key
    tracking: Tracking | None = None  # the container's chain of dumps, under memory tracking
    link: Link | None = None  # this dump's place in it (and its parent, whose pages it lacks)
    writer: ChunkWriter | None = None  # made at the dump when the parent's chunks had to be pinned
    follower: Follower | None = None  # what stored page images while CRIU wrote them
