"""The checkpoint store on disk: one layout, atomic publish and claim, retention.

Layout under the store root (node-local `/var/lib/hotrestart` by default, or any shared
mount such as NFS or CephFS so that a pod moved to another node restores there)::

    v1/staging/<id>/            a checkpoint being written; never read by a restore
    v1/checkpoints/<key>/<id>/  published: manifest.json plus the files it lists
    v1/claimed/<id>/            taken by a restore (rename is the lock: one winner)
    v1/quarantine/<id>/         failed to restore; reason.txt and restore.log beside it
    v1/pending/<key>.<id>       a checkpoint of this identity is being taken right now

`<key>` is a hash of the identity (always within its namespace), and `<id>` is unique per
checkpoint. Every state change is one rename(2) within the store, so a reader sees a
checkpoint whole or not at all, and a process killed at any point leaves at worst a staging
or claimed folder that `prune` clears. Folders are 0700 and files 0600: checkpoints hold
process memory, secrets included.

The root is the administrator's; everything below `v1/` is input, possibly written by
another node, read and changed here by root. So the tree is only ever walked by descriptor
without following links (`safefs`), manifests are validated field by field, and a bad entry
is reported and skipped, never fatal to a listing, a retention pass or another restore.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import functools
import hashlib
import json
import math
import os
import secrets
import socket
import time
from collections.abc import Iterator

from hotrestart.store import archive, safefs, seal
from hotrestart.store.manifest import (
    MAX_MANIFEST,
    Identity,
    Manifest,
    ManifestError,
    UnsupportedManifestError,
)
from hotrestart.store.safefs import UnsafeEntryError
from hotrestart.store.seal import KeyRing, Opener, Sealer, SealError

DEFAULT_ROOT = "/var/lib/hotrestart"
MANIFEST = "manifest.json"
OWNER = "owner"
REASON = "reason.txt"
STATES = ("checkpoints", "claimed", "quarantine", "staging")
PENDING_TTL = 600.0  # a marker older than this is a crashed writer's; a create stops waiting
CLOCK_SKEW = 60.0  # a marker dated further ahead than this is not believed
GRACE = 3600.0  # prune removes a corrupt entry only once it is this old: it may be mid-write
ABANDONED = 3600.0  # a staging or claimed folder of no live owner, untouched this long
_SMALL = 64 << 10  # owner, marker and reason files


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
    root: str = dataclasses.field(default="", repr=False, compare=False)

    @property
    def size(self) -> int:
        """Bytes stored (regular files only; nothing below the entry is followed)."""
        if not self.root:
            return 0
        try:
            with _root(self.root) as rfd, safefs.walk(rfd, _parts(self)) as fd:
                return safefs.tree_size(fd)
        except OSError:
            return 0


def identity_key(identity: Identity) -> str:
    return hashlib.sha256(identity.canonical().encode()).hexdigest()[:32]


def _pid_alive(pid: int) -> bool:
    if not 0 < pid < 1 << 22:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _root(root: str) -> Iterator[int]:
    # The root is the administrator's choice (a link to a shared mount is fine): followed.
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def _parts(entry: Entry) -> list[str]:
    if entry.state == "checkpoints":
        return ["v1", "checkpoints", entry.key, entry.id]
    return ["v1", entry.state, entry.id]


class Store:
    def __init__(self, root: str = DEFAULT_ROOT, *, keys: KeyRing | None = None) -> None:
        self.root = root
        self.base = os.path.join(root, "v1")
        # With a store key, only checkpoints whose manifest authenticates are usable, and
        # every chunk is sealed (seal.py); without one, sealed checkpoints cannot be read.
        self.keys = keys

    def sealer(self, cid: str) -> Sealer | None:
        """What seals checkpoint `cid` being written, when the store has a key."""
        return self.keys.sealer(cid) if self.keys is not None else None

    def _opener(self, entry: Entry) -> Opener | None:
        if entry.manifest is None or not entry.manifest.seal:
            return None
        if self.keys is None:
            raise SealError(f"checkpoint {entry.id} is sealed and this node has no store key")
        return self.keys.opener(entry.manifest.seal, entry.id)

    def _unseal(self, entry: Entry, rel: str) -> archive.ChunkOpen | None:
        opener = self._opener(entry)
        if opener is None:
            return None
        assert entry.manifest is not None
        index = next(i for i, f in enumerate(entry.manifest.files) if f.path == rel)
        return functools.partial(opener.open_chunk_into, index)

    def _authenticate(self, manifest: Manifest, text: bytes, cid: str) -> None:
        """Raise unless the manifest is usable here: sealed and authentic with a key, or
        unsealed without one. A key this node lacks is not proof of corruption."""
        if self.keys is None:
            if manifest.seal:
                raise UnsupportedManifestError("sealed with a store key this node does not have")
            return
        if not manifest.seal:
            raise ManifestError("not sealed with the store key; never restored")
        try:
            opener = self.keys.opener(manifest.seal, cid)
        except SealError as exc:
            raise UnsupportedManifestError(str(exc)) from None
        try:
            opener.verify(seal.canonical(json.loads(text)), manifest.seal.get("mac", ""))
        except SealError as exc:
            raise ManifestError(str(exc)) from None

    def _sign(self, manifest: Manifest, signer: Sealer | Opener | None) -> bytes:
        """The manifest's bytes, with its MAC when there is a key."""
        if signer is None:
            manifest.seal = {}
            return manifest.to_json().encode()
        if isinstance(signer, Sealer):
            manifest.seal = signer.seal_info()
        manifest.seal["mac"] = ""
        manifest.seal["mac"] = signer.sign(seal.canonical(json.loads(manifest.to_json())))
        return manifest.to_json().encode()

    def _dir(self, state: str) -> str:
        return os.path.join(self.base, state)

    @contextlib.contextmanager
    def _at(self, *parts: str, create: bool = False) -> Iterator[int]:
        """The folder v1/<parts...>, verified step by step (made with `create`)."""
        with _root(self.root) as rfd, safefs.walk(rfd, ["v1", *parts], create=create) as fd:
            yield fd

    def ensure(self) -> None:
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        if os.stat(self.root).st_mode & 0o777 != 0o700:
            os.chmod(self.root, 0o700)
        for state in ("staging", "checkpoints", "claimed", "quarantine", "pending"):
            with self._at(state, create=True):
                pass

    # -- writing ------------------------------------------------------------------------------

    def new_staging(self) -> tuple[str, str]:
        """A fresh private staging folder: (checkpoint id, path)."""
        self.ensure()
        cid = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(6)
        with self._at("staging") as sfd:
            os.mkdir(cid, 0o700, dir_fd=sfd)
            with safefs.opened_dir(sfd, cid, create=True) as fd:
                safefs.write_file(fd, OWNER, _owner_line().encode())
        return cid, os.path.join(self._dir("staging"), cid)

    def publish(self, staging: str, manifest: Manifest, sealer: Sealer | None = None) -> Entry | None:
        """Write the manifest and move the staging folder into place in one rename.

        A checkpoint older than one already published for the identity is discarded (None):
        the newest state is the only one worth restoring."""
        if any(e.manifest.created_at > manifest.created_at for e in self._matching(manifest.identity)):
            self.discard(staging)
            return None
        cid = self._staging_name(staging)
        key = identity_key(manifest.identity)
        with self._at("staging") as sfd:
            with safefs.opened_dir(sfd, cid) as fd:
                safefs.write_file(fd, MANIFEST, self._sign(manifest, sealer), durable=True)
                safefs.unlink(fd, OWNER)
                safefs.make_private(fd)
                safefs.fsync(fd)
            with self._at("checkpoints", key, create=True) as kfd:
                safefs.check_name(manifest.id)
                os.rename(cid, manifest.id, src_dir_fd=sfd, dst_dir_fd=kfd)
                safefs.fsync(kfd)
                mtime = safefs.mtime(kfd, manifest.id)
        target = os.path.join(self._dir("checkpoints"), key, manifest.id)
        entry = Entry("checkpoints", manifest.id, target, manifest, key=key, mtime=mtime, root=self.root)
        # Only the newest checkpoint of an identity is worth keeping.
        for older in self._matching(manifest.identity):
            if older.id != manifest.id and older.manifest.created_at <= manifest.created_at:
                with contextlib.suppress(OSError):
                    self.remove(older.entry)
        return entry

    def discard(self, staging: str) -> None:
        with contextlib.suppress(OSError, ValueError), self._at("staging") as sfd:
            safefs.remove_tree(sfd, self._staging_name(staging))

    def _staging_name(self, path: str) -> str:
        parent, name = os.path.split(os.path.normpath(path))
        if os.path.normpath(parent) != os.path.normpath(self._dir("staging")):
            raise ValueError(f"{path} is not a staging folder of this store")
        return safefs.check_name(name)

    # -- pending markers ------------------------------------------------------------------------

    def mark_pending(self, identity: Identity, cid: str) -> None:
        self.ensure()
        with self._at("pending") as fd:
            safefs.write_file(fd, f"{identity_key(identity)}.{cid}", _owner_line(time.time()).encode())

    def clear_pending(self, identity: Identity, cid: str) -> None:
        with contextlib.suppress(FileNotFoundError, UnsafeEntryError), self._at("pending") as fd:
            safefs.unlink(fd, f"{identity_key(identity)}.{cid}")

    def is_pending(self, identity: Identity, *, now: float | None = None) -> bool:
        """A checkpoint of `identity` is being written by a live process (on any node).

        A marker expires after PENDING_TTL (a node that crashed mid-dump never clears its
        own), at once when its local process is gone, and is not believed when dated in the
        future or unreadable: a create waits only for a writer that can still finish."""
        now = time.time() if now is None else now
        prefix = identity_key(identity) + "."
        try:
            with self._at("pending") as fd:
                names = [n for n in os.listdir(fd) if n.startswith(prefix)]
                for name in names:
                    live = self._marker_live(fd, name, now)
                    if live:
                        return True
                    if live is not None:
                        with contextlib.suppress(OSError):
                            safefs.unlink(fd, name)
        except OSError:
            return False  # no folder, or not a real one: nothing to wait for
        return False

    def _marker_live(self, fd: int, name: str, now: float) -> bool | None:
        """Whether a marker's writer may still finish; None when it could not be read now."""
        try:
            host, pid, since = safefs.read_file(fd, name, _SMALL).decode().split()
            started, owner = float(since), int(pid)
        except (UnsafeEntryError, ValueError):
            return False
        except OSError:
            return None
        if not math.isfinite(started) or started > now + CLOCK_SKEW or now - started > PENDING_TTL:
            return False
        return host != socket.gethostname() or _pid_alive(owner)

    # -- reading and claiming -------------------------------------------------------------------

    def published(self, identity: Identity) -> list[Entry]:
        """Every entry in the identity's folder, bad ones included (with their fault)."""
        key = identity_key(identity)
        try:
            with self._at("checkpoints", key) as kfd:
                names = sorted(os.listdir(kfd))
                return [self._entry(kfd, "checkpoints", name, key) for name in names if not name.startswith(".")]
        except OSError:
            return []

    def _matching(self, identity: Identity) -> list[_Good]:
        return [
            _Good(e)
            for e in self.published(identity)
            if e.manifest is not None and e.manifest.identity.same(identity) and e.fault is None
        ]

    def latest(self, identity: Identity) -> Entry | None:
        """The newest readable published checkpoint of `identity` (its namespace included)."""
        good = self._matching(identity)
        best = max(good, key=lambda e: e.manifest.created_at, default=None)
        return best.entry if best is not None else None

    def claim(self, entry: Entry) -> Entry | None:
        """Take `entry` for a restore; None when another restore got it first."""
        self.ensure()
        try:
            with self._parent(entry) as pfd, self._at("claimed") as cfd:
                if not safefs.describe(pfd, entry.id) == "a folder":
                    return None
                os.rename(entry.id, entry.id, src_dir_fd=pfd, dst_dir_fd=cfd)
                with safefs.opened_dir(cfd, entry.id) as fd:
                    safefs.write_file(fd, OWNER, _owner_line().encode())
                mtime = safefs.mtime(cfd, entry.id)
        except OSError:
            return None
        target = os.path.join(self._dir("claimed"), entry.id)
        return Entry("claimed", entry.id, target, entry.manifest, mtime=mtime, root=self.root)

    def release(self, entry: Entry, manifest: Manifest) -> Entry:
        """Give a claimed checkpoint back (with its attempt count updated)."""
        key = identity_key(manifest.identity)
        body = self._sign(manifest, self._opener(dataclasses.replace(entry, manifest=manifest)))
        with self._parent(entry) as pfd:
            with safefs.opened_dir(pfd, entry.id) as fd:
                safefs.unlink(fd, OWNER)
                safefs.write_file(fd, MANIFEST, body, durable=True)
            with self._at("checkpoints", key, create=True) as kfd:
                os.rename(entry.id, entry.id, src_dir_fd=pfd, dst_dir_fd=kfd)
        target = os.path.join(self._dir("checkpoints"), key, entry.id)
        return Entry("checkpoints", entry.id, target, manifest, key=key, mtime=time.time(), root=self.root)

    def quarantine(self, entry: Entry, reason: str, log_file: str = "") -> Entry:
        self.ensure()
        with self._parent(entry) as pfd, self._at("quarantine") as qfd:
            if safefs.describe(pfd, entry.id) != "a folder":
                raise UnsafeEntryError(entry.id, f"is {safefs.describe(pfd, entry.id)}, not a folder")
            os.rename(entry.id, entry.id, src_dir_fd=pfd, dst_dir_fd=qfd)
            with safefs.opened_dir(qfd, entry.id) as fd:
                stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                safefs.write_file(fd, REASON, f"{stamp} {_one_line(reason)}\n".encode())
                if log_file and os.path.exists(log_file):
                    with contextlib.suppress(OSError), open(log_file, "rb") as f:
                        # The log is the shim's own (its work folder); only its copy goes in the store.
                        safefs.write_file(fd, "restore.log", f.read(16 << 20))
        target = os.path.join(self._dir("quarantine"), entry.id)
        return Entry("quarantine", entry.id, target, entry.manifest, mtime=time.time(), root=self.root)

    def remove(self, entry: Entry) -> None:
        """Remove an entry (a folder by descriptor; a link or file in its place is unlinked
        itself, never followed). Renamed out of the way first, so a half-removed checkpoint
        is never read."""
        doomed = f".rm-{entry.id}-{secrets.token_hex(4)}"
        with self._parent(entry) as pfd:
            try:
                with self._at("staging") as sfd:
                    os.rename(entry.id, doomed, src_dir_fd=pfd, dst_dir_fd=sfd)
                    safefs.remove_tree(sfd, doomed)
                    return
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno != errno.EXDEV and not isinstance(exc, UnsafeEntryError):
                    raise
            safefs.remove_tree(pfd, entry.id)

    @contextlib.contextmanager
    def _parent(self, entry: Entry) -> Iterator[int]:
        safefs.check_name(entry.id)
        if entry.state not in STATES:
            raise UnsafeEntryError(entry.id, "is not an entry of this store")
        # An identity folder that is itself bad is listed with no key: its parent is the state's.
        parts = [entry.state] + ([entry.key] if entry.key else [])
        with self._at(*parts) as fd:
            yield fd

    def open_member(self, entry: Entry, rel: str) -> int:
        """A read descriptor of the file `rel` (a manifest path) of `entry`, every folder on
        the way verified and nothing followed; the caller closes it."""
        parts = rel.split("/")
        with _root(self.root) as rfd, safefs.walk(rfd, _parts(entry) + parts[:-1]) as fd:
            return safefs.open_file(fd, parts[-1])

    def restore_file(self, entry: Entry, rel: str, dst: str, *, cap: int | None = None) -> None:
        """Decompress one file of `entry` into `dst` as a restore does (see archive)."""

        files = [f for f in (entry.manifest.files if entry.manifest else []) if f.path == rel]
        if not files:
            raise archive.IntegrityError(f"{rel}: not in the checkpoint's manifest")
        file = files[0]
        try:
            fd = self.open_member(entry, rel)
        except UnsafeEntryError as exc:
            raise archive.IntegrityError(f"{rel}: {exc.why}") from None
        except OSError as exc:  # missing, or a folder on the way is not one
            raise archive.IntegrityError(f"{rel}: cannot be opened: {exc.strerror or exc}") from None
        try:
            try:
                unseal = self._unseal(entry, rel)
            except SealError as exc:
                raise archive.IntegrityError(str(exc)) from None
            archive.decompress_file(fd, dst, file, cap=cap, unseal=unseal)
        finally:
            os.close(fd)

    def verify(self, entry: Entry) -> list[str]:
        """`hotrestart verify`: the restore's checks on every file; the problems found."""

        if entry.manifest is None:
            return [entry.problem or "manifest missing or unreadable"]
        problems = []
        for fe in entry.manifest.files:
            try:
                unseal = self._unseal(entry, fe.path)
                fd = self.open_member(entry, fe.path)
                try:
                    archive.verify_file(fd, fe, unseal=unseal)
                finally:
                    os.close(fd)
            except UnsafeEntryError as exc:
                problems.append(f"{fe.path}: {exc.why}")
            except (archive.IntegrityError, SealError, OSError) as exc:
                problems.append(str(exc))
        return problems

    def reason(self, entry: Entry) -> str:
        """A quarantined entry's reason.txt (one line, bounded), or ""."""
        try:
            with _root(self.root) as rfd, safefs.walk(rfd, _parts(entry)) as fd:
                return _one_line(safefs.read_file(fd, REASON, _SMALL).decode(errors="replace"))
        except OSError:
            return ""

    # -- loading --------------------------------------------------------------------------------

    def _entry(self, parent: int, state: str, name: str, key: str = "") -> Entry:
        path = os.path.join(*([self._dir(state)] + ([key] if key else []) + [name]))
        mtime = safefs.mtime(parent, name)
        manifest: Manifest | None = None
        fault: Fault | None = None
        problem = ""
        try:
            safefs.check_name(name)
            with safefs.opened_dir(parent, name) as fd:
                try:
                    text = safefs.read_file(fd, MANIFEST, MAX_MANIFEST)
                except FileNotFoundError:
                    if state == "checkpoints":  # published means a manifest was written first
                        raise ManifestError("no manifest") from None
                    return Entry(state, name, path, None, None, "no manifest", key, mtime, self.root)
                manifest = Manifest.from_json(text)
                if manifest.id != name:
                    raise ManifestError(f"the manifest is of checkpoint {manifest.id!r}, not {name!r}")
                self._authenticate(manifest, text, name)
                if key and identity_key(manifest.identity) != key:
                    raise ManifestError("the manifest's identity does not belong in this folder")
        except UnsupportedManifestError as exc:
            manifest, fault, problem = None, Fault.UNSUPPORTED, str(exc)
        except ManifestError as exc:
            manifest, fault, problem = None, Fault.CORRUPT, str(exc)
        except UnsafeEntryError as exc:
            # The entry itself not a folder is unsafe; a link or FIFO as its manifest, corrupt.
            manifest, fault = None, (Fault.UNSAFE if exc.what == name else Fault.CORRUPT)
            problem = f"{exc.what} {exc.why}" if exc.what != name else f"{exc.why}; not followed"
        except OSError as exc:
            manifest, fault, problem = None, Fault.UNREADABLE, f"could not be read: {exc.strerror or exc}"
        return Entry(state, name, path, manifest, fault, problem, key, mtime, self.root)

    # -- listing and retention ------------------------------------------------------------------

    def entries(self) -> Iterator[Entry]:
        """Every entry, bad ones included with their fault; nothing in the tree stops it."""
        for state in STATES:
            try:
                with self._at(state) as sfd:
                    names = sorted(n for n in os.listdir(sfd) if not n.startswith("."))
                    if state != "checkpoints":
                        for name in names:
                            yield self._entry(sfd, state, name)
                        continue
                    for key in names:
                        try:
                            with safefs.opened_dir(sfd, key) as kfd:
                                cids = sorted(n for n in os.listdir(kfd) if not n.startswith("."))
                                for cid in cids:
                                    yield self._entry(kfd, state, cid, key)
                        except UnsafeEntryError as exc:
                            path = os.path.join(self._dir(state), key)
                            mtime = safefs.mtime(sfd, key)
                            yield Entry(state, key, path, None, Fault.UNSAFE, f"{exc.why}; not followed", "", mtime)
                        except OSError as exc:
                            problem = f"could not be read: {exc.strerror or exc}"
                            yield Entry(
                                state, key, os.path.join(self._dir(state), key), None, Fault.UNREADABLE, problem
                            )
            except FileNotFoundError:
                continue
            except OSError:
                continue  # reported by problems()

    def problems(self) -> list[str]:
        """What is wrong with the layout itself (a state folder that is a link, say)."""
        found = []
        for state in ("", *STATES, "pending"):
            try:
                with self._at(*([state] if state else [])):
                    pass
            except FileNotFoundError:
                continue
            except OSError as exc:
                found.append(f"v1/{state}: {exc.strerror if not isinstance(exc, UnsafeEntryError) else exc.why}")
        return found

    def find(self, prefix: str) -> Entry | None:
        matches = [e for e in self.entries() if e.id.startswith(prefix)]
        return matches[0] if len(matches) == 1 else None

    def prune(
        self,
        *,
        max_age: float | None = None,
        max_bytes: int | None = None,
        now: float | None = None,
        grace: float = GRACE,
    ) -> list[Entry]:
        """Remove abandoned, corrupt, expired and over-budget checkpoints; returns what was removed.

        Corrupt means proven so (a manifest of a known schema that fails validation, a link
        where a folder belongs), and only once older than `grace`: a manifest being written
        by another node must not be taken for a broken one. Entries of a newer schema and
        entries that could not be read just now (ESTALE, EIO) are never removed."""
        now = time.time() if now is None else now
        removed: list[Entry] = []
        for e in list(self.entries()):
            if e.fault in (Fault.UNSUPPORTED, Fault.UNREADABLE):
                continue
            if e.fault in (Fault.CORRUPT, Fault.UNSAFE):
                doomed = now - e.mtime > grace
            elif e.state in ("staging", "claimed"):
                doomed = not self._owner_alive(e, now)
            else:
                created = e.manifest.created_at if e.manifest else e.mtime
                doomed = max_age is not None and created < now - max_age
            if doomed and self._try_remove(e):
                removed.append(e)
        if max_bytes is not None:
            live = [e for e in self.entries() if e.state in ("checkpoints", "quarantine") and e.fault is None]
            sizes = {e.path: e.size for e in live}
            total = sum(sizes.values())
            # Quarantined first, then the oldest checkpoints.
            live.sort(key=lambda e: (e.state == "checkpoints", e.manifest.created_at if e.manifest else e.mtime))
            for e in live:
                if total <= max_bytes:
                    break
                if self._try_remove(e):
                    removed.append(e)
                    total -= sizes[e.path]
        return removed

    def _try_remove(self, entry: Entry) -> bool:
        try:
            self.remove(entry)
        except OSError:
            return False
        return True

    def _owner_alive(self, entry: Entry, now: float) -> bool:
        try:
            with _root(self.root) as rfd, safefs.walk(rfd, _parts(entry)) as fd:
                host, pid = safefs.read_file(fd, OWNER, _SMALL).decode().split()
                owner = int(pid)
        except (OSError, ValueError):
            # No owner file: a crash between steps. Old enough means abandoned.
            return now - entry.mtime < ABANDONED
        if host != socket.gethostname():
            return now - entry.mtime < ABANDONED
        return _pid_alive(owner)


@dataclasses.dataclass(frozen=True)
class _Good:
    """An entry known to have a valid manifest (for the type checker as much as for us)."""

    entry: Entry

    @property
    def manifest(self) -> Manifest:
        assert self.entry.manifest is not None
        return self.entry.manifest

    @property
    def id(self) -> str:
        return self.entry.id


def _owner_line(since: float | None = None) -> str:
    tail = f" {since!r}" if since is not None else ""
    return f"{socket.gethostname()} {os.getpid()}{tail}\n"


def _one_line(text: str) -> str:
    """Text from the store as one printable line: no terminal escapes reach an admin's screen."""
    return "".join(ch if ch.isprintable() else "?" for ch in text.strip().replace("\n", " "))[:1024]
