"""Warm scale-out: one checkpoint of a warm replica, restored by every new replica of its template.

A pod of a ReplicaSet (Deployment) annotated `hotrestart.io/snapshot: template` is
checkpointed once it is warm, leaving it running. That checkpoint is kept under the pod
template's own identity (`identity.template_of`: the newest only, beside the pool of
stopped replicas) and is never consumed: each new replica of the template that finds no
stopped replica's checkpoint to claim restores from it, with its own address and hostname
(CRIU restores into the new pod's namespaces) and no established TCP connection (they are
closed). A replica restored from it takes no template of its own; a template is taken when
there is none usable (absent, expired, or incompatible after a change of the spec) and is
replaced by the next one taken. The pod template hash is part of the identity, so a changed
template never restores an old one. What the application must tolerate is documented in the
README (cloned memory: seeds, unique ids, leases).

Warm is when `hotrestart.io/snapshot-after` has passed since start, or when the file named by
`hotrestart.io/snapshot-marker` exists in the container; the file is looked for beneath the
container's own root, one component at a time, never following a link.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time

from hotrestart.checkpoint.clock import Clock
from hotrestart.checkpoint.policy import Snapshot
from hotrestart.store.backend import Backend
from hotrestart.store.entry import Entry
from hotrestart.store.manifest import Identity

log = logging.getLogger(__name__)

REASON = "template"  # the manifest's reason: a checkpoint restores without being consumed
MARKER_POLL = 0.5  # seconds between looks for the marker file


def is_template(entry: Entry) -> bool:
    return entry.manifest is not None and entry.manifest.reason == REASON


def current(store: Backend, template: Identity, ttl: float, now: float | None = None) -> Entry | None:
    """The template's usable snapshot, or None; one past its age is removed."""
    entry = store.latest(template)
    if entry is None or entry.manifest is None or not is_template(entry):
        return None
    if (time.time() if now is None else now) - entry.manifest.created_at > ttl:
        log.info("template snapshot %s expired; removing it", entry.id)
        with contextlib.suppress(OSError):
            store.remove(entry)
        return None
    return entry


async def warm(pid: int, snapshot: Snapshot, clock: Clock) -> bool:
    """Wait until the container is warm by the annotations; False when only an API checkpoint
    can say so (neither a delay nor a marker is set)."""
    if not snapshot.after and not snapshot.marker:
        return False
    started = clock.monotonic()
    while True:
        if snapshot.after and clock.monotonic() - started >= snapshot.after:
            return True
        if snapshot.marker and marker_present(pid, snapshot.marker):
            return True
        step = MARKER_POLL if snapshot.marker else snapshot.after - (clock.monotonic() - started)
        await clock.sleep(max(step, 0.01))


def marker_present(pid: int, path: str) -> bool:
    """Whether `path` exists in the container of process `pid`: resolved from the process's
    root, a component at a time, never through a link (a link as the last component counts as
    present: the application made it) and never above the root."""
    parts = [p for p in path.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        return False
    try:
        fd = os.open(f"/proc/{pid}/root", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        for name in parts[:-1]:
            nxt = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nxt
        os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
        return True
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EACCES):
            log.debug("marker %s: %s", path, exc)
        return False
    finally:
        os.close(fd)
