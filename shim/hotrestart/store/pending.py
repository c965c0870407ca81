"""Pending markers: a checkpoint of an identity is being written, so a restore waits for it.

A marker is `v1/pending/<key>.<id>` holding "<host> <pid> <since>". It is cleared by its
writer, expires after PENDING_TTL (a node that crashed mid-dump never clears its own), at
once when its local process is gone, and is not believed when dated in the future or
unreadable: a create waits only for a writer that can still finish.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import time

from hotrestart.store import safefs
from hotrestart.store.entry import identity_key
from hotrestart.store.manifest import Identity
from hotrestart.store.safefs import UnsafeEntryError
from hotrestart.store.tree import SMALL, Tree, owner_line, pid_alive

PENDING_TTL = 600.0  # a marker older than this is a crashed writer's; a create stops waiting
CLOCK_SKEW = 60.0  # a marker dated further ahead than this is not believed


class PendingMarkers:
    def __init__(self, tree: Tree) -> None:
        self._tree = tree

    def mark(self, identity: Identity, cid: str) -> None:
        self._tree.ensure()
        with self._tree.at("pending") as fd:
            safefs.write_file(fd, f"{identity_key(identity)}.{cid}", owner_line(time.time()).encode())

    def clear(self, identity: Identity, cid: str) -> None:
        with contextlib.suppress(FileNotFoundError, UnsafeEntryError), self._tree.at("pending") as fd:
            safefs.unlink(fd, f"{identity_key(identity)}.{cid}")

    def live(self, identity: Identity, now: float) -> bool:
        """A checkpoint of `identity` is being written by a live process (on any node);
        markers found dead are removed on the way."""
        prefix = identity_key(identity) + "."
        try:
            with self._tree.at("pending") as fd:
                names = [n for n in os.listdir(fd) if n.startswith(prefix)]
                for name in names:
                    live = _marker_live(fd, name, now)
                    if live:
                        return True
                    if live is not None:
                        with contextlib.suppress(OSError):
                            safefs.unlink(fd, name)
        except OSError:
            return False  # no folder, or not a real one: nothing to wait for
        return False


def _marker_live(fd: int, name: str, now: float) -> bool | None:
    """Whether a marker's writer may still finish; None when it could not be read now."""
    try:
        text = safefs.read_file(fd, name, SMALL)
    except UnsafeEntryError:
        return False
    except OSError:
        return None
    return marker_live(text, now)


def marker_live(text: bytes, now: float) -> bool:
    """Whether the writer a marker's text ("<host> <pid> <since>") names may still finish."""
    try:
        host, pid, since = text.decode().split()
        started, owner = float(since), int(pid)
    except ValueError:
        return False
    if not math.isfinite(started) or started > now + CLOCK_SKEW or now - started > PENDING_TTL:
        return False
    return host != socket.gethostname() or pid_alive(owner)
