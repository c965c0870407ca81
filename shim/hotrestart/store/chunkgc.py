"""Removing chunks no checkpoint refers to, safe against writers and readers at work.

A chunk is referenced by every manifest in the store that lists it (whatever the entry's
state, and whether or not this node can authenticate it) and by the journal of every
checkpoint being written (`chunks.Journal`). A writer appends a chunk to its journal
before it looks for the chunk in the store, and writes it when it is not there. Removal:

1. list the chunks older than `min_age` that no reference names;
2. rename each to `.doomed-<digest>`;
3. gather the references again;
4. put back those now referenced, remove the rest.

A writer whose journal line came before step 3 is seen there and keeps its chunk; one whose
line came after looks for the chunk after step 2, finds it gone, and writes it again. A
reader finds a doomed chunk under its doomed name. References are gathered state by state
until a listing finds no entry not yet read (an entry may move while the store is read),
and if any manifest cannot be read, or is of a schema this version does not know, nothing
is removed: what it refers to cannot be told. One collection runs at a time per store
(`gc.lock`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator

from hotrestart.store import safefs
from hotrestart.store.chunks import DIGEST, REFS, SPACE, Chunks
from hotrestart.store.manifest import KNOWN_SCHEMAS, MAX_MANIFEST, OLDER_SCHEMAS
from hotrestart.store.safefs import UnsafeEntryError
from hotrestart.store.tree import MANIFEST, SMALL, STATES, Tree, owner_line, pid_alive

log = logging.getLogger(__name__)

MIN_AGE = 600.0  # a chunk younger than this is never removed: its writer may not have journalled it visibly yet
LOCK = "gc.lock"
LOCK_STALE = 3600.0  # a lock of another node untouched this long is taken over
MAX_REFS = 64 << 20  # a journal larger than this cannot be one of ours
_PASSES = 8

Ref = tuple[str, str]  # (space, digest)


class Unknown(Exception):
    """The references cannot all be told: remove nothing."""


def collect(tree: Tree, chunks: Chunks, *, now: float | None = None, min_age: float = MIN_AGE) -> tuple[int, int]:
    """Remove unreferenced chunks; returns (chunks, bytes) removed. Never raises for a
    store it cannot read whole: it then removes nothing."""
    now = time.time() if now is None else now
    try:
        with _locked(tree, now):
            chunks.remove_strays(now - max(min_age, 3600.0))
            return _collect(tree, chunks, now, min_age)
    except (Unknown, BlockingIOError) as exc:
        log.info("chunks not collected: %s", exc)
        return 0, 0
    except OSError as exc:
        log.warning("chunks not collected: %s", exc)
        return 0, 0


def _collect(tree: Tree, chunks: Chunks, now: float, min_age: float) -> tuple[int, int]:
    first = references(tree)
    candidates = [
        (space, digest, size)
        for space, digest, size, mtime in chunks.listing()
        if (space, digest) not in first and now - mtime >= min_age
    ]
    doomed = [(s, d, n) for s, d, n in candidates if chunks.doom(s, d)]
    if not doomed:
        return 0, 0
    try:
        second = references(tree)
    except BaseException:
        for space, digest, _ in doomed:
            chunks.spare(space, digest)
        raise
    removed = freed = 0
    for space, digest, size in doomed:
        if (space, digest) in second:
            chunks.spare(space, digest)
        else:
            chunks.drop(space, digest)
            removed += 1
            freed += size
    return removed, freed


def references(tree: Tree) -> set[Ref]:
    """Every chunk named by a manifest or a journal anywhere in the store."""
    refs: set[Ref] = set()
    seen: set[tuple[str, str]] = set()
    for _ in range(_PASSES):
        fresh = False
        for state, key, name in _entries(tree):
            if (state, name) in seen:
                continue
            fresh = True
            try:
                refs |= _entry_refs(tree, [state, *([key] if key else []), name], state)
            except FileNotFoundError:
                continue  # moved on since it was listed: the next pass finds it where it went
            seen.add((state, name))
        if not fresh:
            return refs
    raise Unknown("the store's entries kept moving while they were read")


def _entries(tree: Tree) -> Iterator[tuple[str, str, str]]:
    # Published before claimed: an entry moves staging -> checkpoints -> claimed ->
    # quarantine in this order, and back only on release, which the next pass catches.
    for state in ("staging", "checkpoints", "claimed", "quarantine"):
        assert state in STATES
        try:
            with tree.at(state) as sfd:
                names = sorted(n for n in os.listdir(sfd) if not n.startswith("."))
                if state != "checkpoints":
                    yield from ((state, "", n) for n in names)
                    continue
                for key in names:
                    try:
                        with safefs.opened_dir(sfd, key) as kfd:
                            cids = sorted(n for n in os.listdir(kfd) if not n.startswith("."))
                    except UnsafeEntryError:
                        continue  # not a folder the store made: nothing in it is read
                    yield from ((state, key, c) for c in cids)
        except FileNotFoundError:
            continue


def _entry_refs(tree: Tree, parts: list[str], state: str) -> set[Ref]:
    try:
        with tree.at(*parts) as fd:
            refs = _manifest_refs(fd)
            if state == "staging":
                refs |= _journal_refs(fd)
            return refs
    except UnsafeEntryError:
        return set()  # a link or special file where an entry belongs refers to nothing


def _manifest_refs(fd: int) -> set[Ref]:
    try:
        text = safefs.read_file(fd, MANIFEST, MAX_MANIFEST)
    except FileNotFoundError:
        return set()
    except UnsafeEntryError:
        return set()
    return manifest_refs(text)


def manifest_refs(text: bytes) -> set[Ref]:
    """The chunks a manifest's text names; raises Unknown for a schema this version does not know."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return set()  # not a manifest: nothing can be restored from it
    if not isinstance(data, dict):
        return set()
    schema = data.get("schema")
    if not isinstance(schema, str):
        return set()  # not a manifest of any version
    if schema in OLDER_SCHEMAS:
        return set()  # its files are in its own folder, not among the chunks
    if schema not in KNOWN_SCHEMAS:
        raise Unknown(f"a manifest of schema {schema[:64]!r}")
    # Read leniently, not validated or authenticated: keeping too much is safe.
    space = data.get("space")
    files = data.get("files")
    refs: set[Ref] = set()
    if not isinstance(space, str) or not isinstance(files, list):
        return refs
    for f in files:
        chunks = f.get("chunks") if isinstance(f, dict) else None
        for c in chunks if isinstance(chunks, list) else []:
            digest = c.get("digest") if isinstance(c, dict) else None
            if isinstance(digest, str):
                refs.add((space, digest))
    return refs


def _journal_refs(fd: int) -> set[Ref]:
    try:
        text = safefs.read_file(fd, REFS, MAX_REFS)
    except FileNotFoundError:
        return set()
    refs: set[Ref] = set()
    for line in text.decode(errors="replace").splitlines():
        space, _, digest = line.partition(" ")
        if SPACE.fullmatch(space) and DIGEST.fullmatch(digest):
            refs.add((space, digest))
    return refs


@contextlib.contextmanager
def _locked(tree: Tree, now: float) -> Iterator[None]:
    with tree.at(create=False) as base:
        try:
            safefs.write_exclusive(base, LOCK, owner_line().encode())
        except FileExistsError:
            if not _stale(base, now):
                raise BlockingIOError("another collection is running") from None
            safefs.unlink(base, LOCK)
            safefs.write_exclusive(base, LOCK, owner_line().encode())
        try:
            yield
        finally:
            safefs.unlink(base, LOCK)


def _stale(base: int, now: float) -> bool:
    try:
        host, pid = safefs.read_file(base, LOCK, SMALL).decode().split()[:2]
        if host == socket.gethostname():
            return not pid_alive(int(pid))
    except (OSError, ValueError):
        pass
    with contextlib.suppress(OSError):
        return now - safefs.mtime(base, LOCK) > LOCK_STALE
    return True
