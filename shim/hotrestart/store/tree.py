"""The directory store's tree: its layout, and its folders opened by descriptor only.

Layout under the store root (node-local `/var/lib/hotrestart` by default, or any shared
mount such as NFS or CephFS so that a pod moved to another node restores there)::

    v1/staging/<id>/            a checkpoint being written; never read by a restore
    v1/checkpoints/<key>/<id>/  published: manifest.json plus the files it lists
    v1/claimed/<id>/            taken by a restore (rename is the lock: one winner)
    v1/quarantine/<id>/         failed to restore; reason.txt and restore.log beside it
    v1/pending/<key>.<id>       a checkpoint of this identity is being taken right now
    v1/workloads/<ns>/<key>     a workload identity (Job, pod template) of namespace <ns> was
                                checkpointed: new pods there ask containerd for their labels
    v1/chunks/<space>/<aa>/<d>  the chunks every checkpoint's files are made of, named by the
                                digest of their content and shared (`chunks`, `chunkgc`)
    v1/gc.lock                  a chunk collection is running

`<key>` is a hash of the identity (`entry.identity_key`), and `<id>` is unique per
checkpoint. Folders are 0700 and files 0600: checkpoints hold process memory, secrets
included. The root is the administrator's; everything below `v1/` is input, possibly
written by another node, so it is only ever walked by descriptor without following links
(`safefs`).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

from hotrestart.store import safefs
from hotrestart.store.entry import Entry
from hotrestart.store.safefs import UnsafeEntryError

MANIFEST = "manifest.json"
OWNER = "owner"  # in a staging or claimed folder: "<host> <pid>" of the process working on it
REASON = "reason.txt"
STATES = ("checkpoints", "claimed", "quarantine", "staging")
SMALL = 64 << 10  # owner, marker and reason files


class Tree:
    """The folders of one store root, each reached step by step from the root."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.base = os.path.join(root, "v1")

    def dir(self, state: str) -> str:
        return os.path.join(self.base, state)

    @contextlib.contextmanager
    def _root(self) -> Iterator[int]:
        # The root is the administrator's choice (a link to a shared mount is fine): followed.
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            yield fd
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def at(self, *parts: str, create: bool = False) -> Iterator[int]:
        """The folder v1/<parts...>, verified step by step (made with `create`)."""
        with self._root() as rfd, safefs.walk(rfd, ["v1", *parts], create=create) as fd:
            yield fd

    @contextlib.contextmanager
    def of(self, entry: Entry, *below: str) -> Iterator[int]:
        """The entry's own folder (or a folder `below` it), verified step by step."""
        with self.at(*_parts(entry), *below) as fd:
            yield fd

    @contextlib.contextmanager
    def parent(self, entry: Entry) -> Iterator[int]:
        """The folder that holds the entry, for renaming it elsewhere."""
        safefs.check_name(entry.id)
        if entry.state not in STATES:
            raise UnsafeEntryError(entry.id, "is not an entry of this store")
        # An identity folder that is itself bad is listed with no key: its parent is the state's.
        parts = [entry.state] + ([entry.key] if entry.key else [])
        with self.at(*parts) as fd:
            yield fd

    def ensure(self) -> None:
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        if os.stat(self.root).st_mode & 0o777 != 0o700:
            os.chmod(self.root, 0o700)
        for state in ("staging", "checkpoints", "claimed", "quarantine", "pending"):
            with self.at(state, create=True):
                pass


def _parts(entry: Entry) -> list[str]:
    if entry.state == "checkpoints":
        return ["checkpoints", entry.key, entry.id]
    return [entry.state, entry.id]


def owner_line(since: float | None = None) -> str:
    """What an owner file or pending marker says: this host and process (and since when)."""
    tail = f" {since!r}" if since is not None else ""
    return f"{socket.gethostname()} {os.getpid()}{tail}\n"


def pid_alive(pid: int) -> bool:
    if not 0 < pid < 1 << 22:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def one_line(text: str) -> str:
    """Text from the store as one printable line: no terminal escapes reach an admin's screen."""
    return "".join(ch if ch.isprintable() else "?" for ch in text.strip().replace("\n", " "))[:1024]
