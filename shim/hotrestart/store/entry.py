"""What a store lists: one checkpoint's entry, in whatever state and however damaged.

The same record comes from every backend: the engine and `hotrestart ls` read state,
manifest and fault from it and hand it back to the store to claim, release, quarantine or
remove; only the store that listed it knows what its `path` points at.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib

from hotrestart.store.manifest import Identity, Manifest


class Fault(enum.Enum):
    """Why an entry has no usable manifest; what retention may do about it."""

    CORRUPT = "corrupt"  # proven bad: pruned after the grace period
    UNSAFE = "unsafe"  # a link or special file where a folder belongs: the name is pruned after grace
    UNSUPPORTED = "unsupported"  # a newer writer's: never pruned here
    UNREADABLE = "unreadable"  # a read failed (ESTALE, EIO): maybe transient, never pruned


@dataclasses.dataclass(frozen=True)
class Entry:
    state: str  # staging, checkpoints, claimed, quarantine
    id: str
    path: str
    manifest: Manifest | None
    fault: Fault | None = None  # set when the manifest is missing or refused
    problem: str = ""  # the reason, for `hotrestart ls` and the logs
    key: str = ""  # the identity folder of a published entry
    mtime: float = 0.0  # of the entry itself (not followed)


@dataclasses.dataclass(frozen=True)
class Good:
    """An entry known to have a valid manifest (for the type checker as much as for us)."""

    entry: Entry

    @property
    def manifest(self) -> Manifest:
        assert self.entry.manifest is not None
        return self.entry.manifest

    @property
    def id(self) -> str:
        return self.entry.id


def identity_key(identity: Identity) -> str:
    """Where an identity's checkpoints are kept: a hash of its canonical form (namespace included)."""
    return hashlib.sha256(identity.canonical().encode()).hexdigest()[:32]
