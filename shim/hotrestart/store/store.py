"""The checkpoint store on disk: one layout, atomic publish and claim, retention.

Layout under the store root (node-local `/var/lib/hotrestart` by default, or any shared
mount such as NFS or CephFS so that a pod moved to another node restores there)::

    v1/staging/<id>/            a checkpoint being written; never read by a restore
    v1/checkpoints/<key>/<id>/  published: manifest.json plus the files it lists
    v1/claimed/<id>/            taken by a restore (rename is the lock: one winner)
    v1/quarantine/<id>/         failed to restore; reason.txt and restore.log beside it
    v1/pending/<key>.<id>       a checkpoint of this identity is being taken right now

`<key>` is a hash of the identity (namespace/pod/container or the annotation's key), and
`<id>` is unique per checkpoint. Every state change is one rename(2) within the store, so a
reader sees a checkpoint whole or not at all, and a process killed at any point leaves at
worst a staging or claimed folder that `prune` clears. Folders are 0700 and files 0600:
checkpoints hold process memory, secrets included.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import secrets
import shutil
import socket
import time
from collections.abc import Iterator

from hotrestart.store.manifest import Identity, Manifest, ManifestError

DEFAULT_ROOT = "/var/lib/hotrestart"
MANIFEST = "manifest.json"
OWNER = "owner"


@dataclasses.dataclass(frozen=True)
class Entry:
    state: str  # staging, checkpoints, claimed, quarantine
    id: str
    path: str
    manifest: Manifest | None

    @property
    def size(self) -> int:
        return _tree_size(self.path)


def identity_key(identity: Identity) -> str:
    return hashlib.sha256(identity.canonical().encode()).hexdigest()[:32]


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tree_size(path: str) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Store:
    def __init__(self, root: str = DEFAULT_ROOT) -> None:
        self.root = root
        self.base = os.path.join(root, "v1")

    def _dir(self, state: str) -> str:
        return os.path.join(self.base, state)

    def ensure(self) -> None:
        for path in (self.root, self.base):
            _private_dir(path)
        for state in ("staging", "checkpoints", "claimed", "quarantine", "pending"):
            _private_dir(self._dir(state))

    # -- writing ------------------------------------------------------------------------------

    def new_staging(self) -> tuple[str, str]:
        """A fresh private staging folder: (checkpoint id, path)."""
        self.ensure()
        cid = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(6)
        path = os.path.join(self._dir("staging"), cid)
        os.mkdir(path, 0o700)
        os.chmod(path, 0o700)
        with open(os.path.join(path, OWNER), "w", opener=_private) as f:
            f.write(f"{socket.gethostname()} {os.getpid()}\n")
        return cid, path

    def publish(self, staging: str, manifest: Manifest) -> Entry | None:
        """Write the manifest and move the staging folder into place in one rename.

        A checkpoint older than one already published for the identity is discarded (None):
        the newest state is the only one worth restoring."""
        published = self.published(manifest.identity)
        if any(e.manifest and e.manifest.created_at > manifest.created_at for e in published):
            self.discard(staging)
            return None
        with open(os.path.join(staging, MANIFEST), "w", opener=_private) as f:
            f.write(manifest.to_json())
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(staging, OWNER))
        for dirpath, _dirs, files in os.walk(staging):
            os.chmod(dirpath, 0o700)
            for name in files:
                os.chmod(os.path.join(dirpath, name), 0o600)
        _fsync_dir(staging)
        parent = os.path.join(self._dir("checkpoints"), identity_key(manifest.identity))
        _private_dir(parent)
        target = os.path.join(parent, manifest.id)
        os.rename(staging, target)
        _fsync_dir(parent)
        entry = Entry("checkpoints", manifest.id, target, manifest)
        # Only the newest checkpoint of an identity is worth keeping.
        for older in self.published(manifest.identity):
            if older.id != manifest.id and older.manifest and older.manifest.created_at <= manifest.created_at:
                self.remove(older)
        return entry

    def discard(self, staging: str) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    # -- pending markers ------------------------------------------------------------------------

    def mark_pending(self, identity: Identity, cid: str) -> None:
        self.ensure()
        path = os.path.join(self._dir("pending"), f"{identity_key(identity)}.{cid}")
        with open(path, "w", opener=_private) as f:
            f.write(f"{socket.gethostname()} {os.getpid()} {time.time()}\n")

    def clear_pending(self, identity: Identity, cid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self._dir("pending"), f"{identity_key(identity)}.{cid}"))

    def is_pending(self, identity: Identity) -> bool:
        """A checkpoint of `identity` is being written by a live process (on any node)."""
        prefix = identity_key(identity) + "."
        try:
            names = [n for n in os.listdir(self._dir("pending")) if n.startswith(prefix)]
        except FileNotFoundError:
            return False
        for name in names:
            path = os.path.join(self._dir("pending"), name)
            try:
                with open(path) as f:
                    host, pid, _since = f.read().split()
            except (OSError, ValueError):
                continue
            if host == socket.gethostname() and not _pid_alive(int(pid)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                continue
            return True
        return False

    # -- reading and claiming -------------------------------------------------------------------

    def published(self, identity: Identity) -> list[Entry]:
        parent = os.path.join(self._dir("checkpoints"), identity_key(identity))
        try:
            names = os.listdir(parent)
        except FileNotFoundError:
            return []
        entries = []
        for name in names:
            path = os.path.join(parent, name)
            entries.append(Entry("checkpoints", name, path, self._load(path)))
        return entries

    def latest(self, identity: Identity) -> Entry | None:
        """The newest readable published checkpoint of `identity`."""
        good = [e for e in self.published(identity) if e.manifest is not None]
        good = [e for e in good if e.manifest and e.manifest.identity.canonical() == identity.canonical()]
        return max(good, key=lambda e: e.manifest.created_at if e.manifest else 0.0, default=None)

    def claim(self, entry: Entry) -> Entry | None:
        """Take `entry` for a restore; None when another restore got it first."""
        self.ensure()
        target = os.path.join(self._dir("claimed"), entry.id)
        try:
            os.rename(entry.path, target)
        except (FileNotFoundError, OSError):
            return None
        with open(os.path.join(target, OWNER), "w", opener=_private) as f:
            f.write(f"{socket.gethostname()} {os.getpid()}\n")
        return Entry("claimed", entry.id, target, entry.manifest)

    def release(self, entry: Entry, manifest: Manifest) -> Entry:
        """Give a claimed checkpoint back (with its attempt count updated)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(entry.path, OWNER))
        with open(os.path.join(entry.path, MANIFEST), "w", opener=_private) as f:
            f.write(manifest.to_json())
        parent = os.path.join(self._dir("checkpoints"), identity_key(manifest.identity))
        _private_dir(parent)
        target = os.path.join(parent, entry.id)
        os.rename(entry.path, target)
        return Entry("checkpoints", entry.id, target, manifest)

    def quarantine(self, entry: Entry, reason: str, log_file: str = "") -> Entry:
        self.ensure()
        target = os.path.join(self._dir("quarantine"), entry.id)
        os.rename(entry.path, target)
        with open(os.path.join(target, "reason.txt"), "w", opener=_private) as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {reason}\n")
        if log_file and os.path.exists(log_file):
            with contextlib.suppress(OSError):
                shutil.copyfile(log_file, os.path.join(target, "restore.log"))
                os.chmod(os.path.join(target, "restore.log"), 0o600)
        return Entry("quarantine", entry.id, target, entry.manifest)

    def remove(self, entry: Entry) -> None:
        # Rename out of the way first, so a half-removed checkpoint is never read.
        doomed = os.path.join(self._dir("staging"), f".rm-{entry.id}-{secrets.token_hex(4)}")
        try:
            os.rename(entry.path, doomed)
        except OSError:
            doomed = entry.path
        shutil.rmtree(doomed, ignore_errors=True)

    def _load(self, path: str) -> Manifest | None:
        try:
            with open(os.path.join(path, MANIFEST), "rb") as f:
                return Manifest.from_json(f.read())
        except (OSError, ManifestError):
            return None

    # -- listing and retention ------------------------------------------------------------------

    def entries(self) -> Iterator[Entry]:
        for state in ("checkpoints", "claimed", "quarantine", "staging"):
            base = self._dir(state)
            try:
                names = sorted(os.listdir(base))
            except FileNotFoundError:
                continue
            for name in names:
                path = os.path.join(base, name)
                if state == "checkpoints":
                    for cid in sorted(os.listdir(path)) if os.path.isdir(path) else []:
                        sub = os.path.join(path, cid)
                        yield Entry(state, cid, sub, self._load(sub))
                else:
                    yield Entry(state, name, path, self._load(path))

    def find(self, prefix: str) -> Entry | None:
        matches = [e for e in self.entries() if e.id.startswith(prefix)]
        return matches[0] if len(matches) == 1 else None

    def prune(
        self, *, max_age: float | None = None, max_bytes: int | None = None, now: float | None = None
    ) -> list[Entry]:
        """Remove expired, abandoned and over-budget checkpoints; returns what was removed."""
        now = now or time.time()
        removed: list[Entry] = []
        entries = list(self.entries())
        for e in entries:
            owner_dead = e.state in ("staging", "claimed") and not self._owner_alive(e.path)
            expired = (
                e.state in ("checkpoints", "quarantine")
                and max_age is not None
                and (e.manifest.created_at if e.manifest else _mtime(e.path)) < now - max_age
            )
            unreadable = e.state == "checkpoints" and e.manifest is None
            if owner_dead or expired or unreadable:
                self.remove(e)
                removed.append(e)
        if max_bytes is not None:
            live = [e for e in self.entries() if e.state in ("checkpoints", "quarantine")]
            sizes = {e.path: e.size for e in live}
            total = sum(sizes.values())
            # Quarantined first, then the oldest checkpoints.
            live.sort(key=lambda e: (e.state == "checkpoints", e.manifest.created_at if e.manifest else 0.0))
            for e in live:
                if total <= max_bytes:
                    break
                self.remove(e)
                removed.append(e)
                total -= sizes[e.path]
        return removed

    def _owner_alive(self, path: str) -> bool:
        try:
            with open(os.path.join(path, OWNER)) as f:
                host, pid = f.read().split()
        except (OSError, ValueError):
            # No owner file: a crash between steps. Old enough means abandoned.
            return time.time() - _mtime(path) < 3600
        if host != socket.gethostname():
            return time.time() - _mtime(path) < 3600
        return _pid_alive(int(pid))


def _private_dir(path: str) -> None:
    """A 0700 folder whatever the umask (makedirs' mode is filtered by it)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    if os.stat(path).st_mode & 0o777 != 0o700:
        os.chmod(path, 0o700)


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def _private(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_CLOEXEC, 0o600)
