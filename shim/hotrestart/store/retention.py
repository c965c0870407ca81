"""Retention: which entries a prune removes, and in what order.

Removed are staging and claimed entries of no live owner, corrupt entries once past a
grace period, checkpoints older than a maximum age, then (quarantined first, then the
oldest checkpoints) whatever keeps the store over its size budget. Entries of a newer
schema and entries that could not be read just now are never removed. The policy holds
for any backend that can list, size and remove entries and tell a live owner.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from hotrestart.store.entry import Entry, Fault

GRACE = 3600.0  # prune removes a corrupt entry only once it is this old: it may be mid-write
ABANDONED = 3600.0  # a staging or claimed folder of no live owner, untouched this long


class Prunable(Protocol):
    def entries(self) -> Iterator[Entry]: ...
    def remove(self, entry: Entry) -> None: ...
    def size(self, entry: Entry) -> int: ...
    def owner_alive(self, entry: Entry, now: float) -> bool: ...


def prune(
    store: Prunable,
    *,
    max_age: float | None,
    max_bytes: int | None,
    now: float,
    grace: float,
) -> list[Entry]:
    """Remove abandoned, corrupt, expired and over-budget checkpoints; returns what was removed.

    Corrupt means proven so (a manifest of a known schema that fails validation, a link
    where a folder belongs), and only once older than `grace`: a manifest being written
    by another node must not be taken for a broken one."""
    removed: list[Entry] = []
    for e in list(store.entries()):
        if e.fault in (Fault.UNSUPPORTED, Fault.UNREADABLE):
            continue
        if e.fault in (Fault.CORRUPT, Fault.UNSAFE):
            doomed = now - e.mtime > grace
        elif e.state in ("staging", "claimed"):
            doomed = not store.owner_alive(e, now)
        else:
            created = e.manifest.created_at if e.manifest else e.mtime
            doomed = max_age is not None and created < now - max_age
        if doomed and _try_remove(store, e):
            removed.append(e)
    if max_bytes is not None:
        live = [e for e in store.entries() if e.state in ("checkpoints", "quarantine") and e.fault is None]
        sizes = {e.path: store.size(e) for e in live}
        total = sum(sizes.values())
        # Quarantined first, then the oldest checkpoints.
        live.sort(key=lambda e: (e.state == "checkpoints", e.manifest.created_at if e.manifest else e.mtime))
        for e in live:
            if total <= max_bytes:
                break
            if _try_remove(store, e):
                removed.append(e)
                total -= sizes[e.path]
    return removed


def _try_remove(store: Prunable, entry: Entry) -> bool:
    try:
        store.remove(entry)
    except OSError:
        return False
    return True
