"""The checkpoint store as the engine and `hotrestart` use it, whatever keeps the checkpoints.

`store.Store` (a directory tree, node-local or on a shared mount) is the first backend; an
object store can be another, chosen in `config`, with no change to the engine. A backend
keeps each checkpoint whole or not at all: a reader never sees one half published,
claimed or removed, and one claim of an entry wins.

Errors: a change the store cannot make raises OSError (`safefs.UnsafeEntryError` when what
is there is not what the store writes), and callers treat it as the store being out of
reach; a stored file that does not match its manifest raises `chunkcodec.IntegrityError`, a
key that is missing or does not authenticate `seal.SealError`. All of these but OSError
itself are `errors.StoreError`s.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from hotrestart.store import restores
from hotrestart.store.archive import FileReader
from hotrestart.store.chunkwrite import ChunkWriter
from hotrestart.store.entry import Entry
from hotrestart.store.manifest import Identity, Manifest
from hotrestart.store.seal import Sealer


class Backend(Protocol):
    collected: tuple[int, int]  # chunks and bytes the last prune removed
    remote: bool  # its calls wait on the network: the shim makes them off its event loop
    io_threads: int  # chunks written or fetched at once

    # -- writing a checkpoint ---------------------------------------------------------------------

    def sealer(self, cid: str) -> Sealer | None:
        """What seals checkpoint `cid` being written, when the store has a key."""
        ...

    def new_staging(self) -> tuple[str, str]:
        """A fresh private local folder to write a checkpoint's files into: (checkpoint id, path)."""
        ...

    def chunk_writer(self, staging: str) -> ChunkWriter:
        """What stores the files of the checkpoint being written in `staging` as chunks,
        writing only those the store does not hold yet; the caller closes it."""
        ...

    def publish(self, staging: str, manifest: Manifest, sealer: Sealer | None = None) -> Entry | None:
        """Make the staging folder, with `manifest` (signed by `sealer`), a published
        checkpoint in one atomic step, and drop the identity's older ones. A checkpoint
        older than one already published for the identity is discarded instead (None)."""
        ...

    def discard(self, staging: str) -> None:
        """Throw a staging folder away; never raises."""
        ...

    # -- pending markers ----------------------------------------------------------------------------

    def mark_pending(self, identity: Identity, cid: str) -> None:
        """A checkpoint `cid` of `identity` is being taken: restores wait for it."""
        ...

    def clear_pending(self, identity: Identity, cid: str) -> None: ...

    def is_pending(self, identity: Identity, *, now: float | None = None) -> bool:
        """A checkpoint of `identity` is being written by a writer that can still finish."""
        ...

    # -- listing ------------------------------------------------------------------------------------

    def entries(self) -> Iterator[Entry]:
        """Every entry in every state, bad ones included with their fault."""
        ...

    def published(self, identity: Identity) -> list[Entry]:
        """The identity's published entries, bad ones included."""
        ...

    def latest(self, identity: Identity) -> Entry | None:
        """The newest usable published checkpoint of `identity`."""
        ...

    def has_workloads(self, namespace: str) -> bool:
        """Whether a workload identity (Job, pod template) of `namespace` was ever checkpointed."""
        ...

    def candidates(self, identity: Identity) -> list[Entry]:
        """The identity's usable checkpoints, newest first (a pool's members in claim order)."""
        ...

    def find(self, prefix: str) -> Entry | None:
        """The one entry whose id starts with `prefix`, or None."""
        ...

    def problems(self) -> list[str]:
        """What is wrong with the store itself, as opposed to one entry."""
        ...

    def reason(self, entry: Entry) -> str:
        """Why a quarantined entry was quarantined (one printable line), or ""."""
        ...

    def size(self, entry: Entry) -> int:
        """Bytes the entry takes in the store (0 when that cannot be told)."""
        ...

    # -- a restore's claim --------------------------------------------------------------------------

    def claim(self, entry: Entry) -> Entry | None:
        """Take `entry` for a restore; None when another restore got it first."""
        ...

    def release(self, entry: Entry, manifest: Manifest) -> Entry:
        """Give a claimed checkpoint back, with `manifest` (its attempt count) rewritten."""
        ...

    def quarantine(self, entry: Entry, reason: str, log_file: str = "") -> Entry:
        """Set an entry aside as not restorable, with the reason and the restore's log."""
        ...

    def remove(self, entry: Entry) -> None:
        """Remove an entry; a half-removed one is never read."""
        ...

    def note_restore(self, entry: Entry, record: restores.Record) -> None:
        """Keep what the restore holding `entry` did (`restores`), for `hotrestart inspect`."""
        ...

    def restore_record(self, entry: Entry) -> restores.Record | None:
        """What the last restore of `entry` noted, or None."""
        ...

    # -- reading stored files -----------------------------------------------------------------------

    def restore_file(self, entry: Entry, rel: str, dst: str, *, cap: int | None = None) -> None:
        """Decompress the file `rel` of `entry` into the local path `dst`, verified (and
        opened with the key) on the way; at most `cap` raw bytes. Nothing of a file that
        fails is left at `dst`."""
        ...

    def file_reader(self, entry: Entry, rel: str, *, ahead: int = 0) -> FileReader:
        """Random reads of the file `rel` of `entry`, each chunk verified (and opened with
        the key) before a byte of it is returned; for serving memory on demand. `ahead`:
        how many chunks past the one read are fetched meanwhile (0: the backend's choice)."""
        ...

    def verify(self, entry: Entry) -> list[str]:
        """A restore's checks on every file of `entry`, writing nothing; the problems found."""
        ...

    # -- retention ----------------------------------------------------------------------------------

    def prune(
        self,
        *,
        max_age: float | None = None,
        max_bytes: int | None = None,
        now: float | None = None,
        grace: float = ...,
    ) -> list[Entry]:
        """Remove abandoned, corrupt, expired and over-budget entries (see `retention`),
        then the chunks nothing refers to any more; returns the entries removed."""
        ...
