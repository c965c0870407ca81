"""The directory store: checkpoints in a folder tree, changed by one rename(2) at a time.

The first `backend.Backend`: a node-local folder (`/var/lib/hotrestart` by default) or
any shared mount such as NFS or CephFS, so that a pod moved to another node restores
there. Its layout is `tree`'s. Every state change is one rename within the store, so a
reader sees a checkpoint whole or not at all, and a process killed at any point leaves at
worst a staging or claimed folder that `prune` clears. Listing is `listing`'s, pending
markers `pending`'s, retention `retention`'s; what is here changes entries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import os
import secrets
import socket
import time
from collections.abc import Iterator

from hotrestart.store import archive, chunkgc, restores, retention, safefs
from hotrestart.store.chunks import REFS, Chunks, Journal
from hotrestart.store.chunkwrite import ChunkWriter, workers
from hotrestart.store.entry import Entry, Good, identity_key
from hotrestart.store.listing import Listing
from hotrestart.store.manifest import Identity, Manifest
from hotrestart.store.pending import PendingMarkers
from hotrestart.store.safefs import UnsafeEntryError
from hotrestart.store.seal import KeyRing, Sealer
from hotrestart.store.sealing import Sealing
from hotrestart.store.storedfiles import StoredFiles
from hotrestart.store.tree import MANIFEST, OWNER, REASON, SMALL, Tree, one_line, owner_line, pid_alive

DEFAULT_ROOT = "/var/lib/hotrestart"


# Identities derived from a pod's labels start with this (checkpoint/identity.py).
WORKLOAD_PREFIX = "@"
# A pool keeps one checkpoint per stopped member, up to this many, for this long (seconds).
POOL_CAP = 16
POOL_TTL = 24 * 3600


class Store:
    def __init__(self, root: str = DEFAULT_ROOT, *, keys: KeyRing | None = None) -> None:
        self.root = root
        self.tree = Tree(root)
        # With a store key, only checkpoints whose manifest authenticates are usable, and
        # every chunk is sealed (seal.py); without one, sealed checkpoints cannot be read.
        self.keys = keys
        self._sealing = Sealing(keys)
        self._listing = Listing(self.tree, self._sealing)
        self._pending = PendingMarkers(self.tree)
        self.chunks = Chunks(self.tree)
        self.collected = (0, 0)  # chunks and bytes the last prune removed
        self.remote = False  # a shared mount is as quick to ask as the node's disk, or hangs it all
        self.io_threads = workers()  # bound by the cores: compressing and hashing
        self._files = StoredFiles(
            self._sealing,
            lambda space: lambda d, n: self.chunks.read(space, d, n),
            self.chunks.discard,
            self.io_threads,
        )

    def sealer(self, cid: str) -> Sealer | None:
        """What seals checkpoint `cid` being written, when the store has a key."""
        return self._sealing.sealer(cid)

    def ensure(self) -> None:
        """Make the root and the layout's folders, private."""
        self.tree.ensure()

    # -- writing ------------------------------------------------------------------------------

    def new_staging(self) -> tuple[str, str]:
        """A fresh private staging folder: (checkpoint id, path)."""
        self.ensure()
        cid = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(6)
        with self.tree.at("staging") as sfd:
            os.mkdir(cid, 0o700, dir_fd=sfd)
            with safefs.opened_dir(sfd, cid, create=True) as fd:
                safefs.write_file(fd, OWNER, owner_line().encode())
        return cid, os.path.join(self.tree.dir("staging"), cid)

    def chunk_writer(self, staging: str) -> ChunkWriter:
        """What stores the files of the checkpoint being written in `staging` as chunks; the
        caller closes it."""
        with self.tree.at("staging") as sfd, safefs.opened_dir(sfd, self._staging_name(staging)) as fd:
            journal = Journal(fd)
        return ChunkWriter(self.chunks, self._sealing.writing(), journal, self.io_threads)

    def publish(self, staging: str, manifest: Manifest, sealer: Sealer | None = None) -> Entry | None:
        """Write the manifest and move the staging folder into place in one rename.

        A checkpoint older than one already published for the identity is discarded (None):
        the newest state is the only one worth restoring. A pool (the replicas of one pod
        template) keeps one per member (pod) instead, the newest `POOL_CAP` and none older
        than `POOL_TTL`."""
        if any(e.manifest.created_at > manifest.created_at for e in self._same_member(manifest)):
            self.discard(staging)
            return None
        cid = self._staging_name(staging)
        key = identity_key(manifest.identity)
        with self.tree.at("staging") as sfd:
            with safefs.opened_dir(sfd, cid) as fd:
                safefs.write_file(fd, MANIFEST, self._sealing.sign(manifest, sealer), durable=True)
                safefs.unlink(fd, OWNER)
                safefs.unlink(fd, REFS)  # the manifest lists them now
                safefs.make_private(fd)
                safefs.fsync(fd)
            with self.tree.at("checkpoints", key, create=True) as kfd:
                safefs.check_name(manifest.id)
                os.rename(cid, manifest.id, src_dir_fd=sfd, dst_dir_fd=kfd)
                safefs.fsync(kfd)
                mtime = safefs.mtime(kfd, manifest.id)
        target = os.path.join(self.tree.dir("checkpoints"), key, manifest.id)
        entry = Entry("checkpoints", manifest.id, target, manifest, key=key, mtime=mtime)
        for older in self._superseded(manifest):
            with contextlib.suppress(OSError):
                self.remove(older.entry)
        return entry

    def _superseded(self, manifest: Manifest) -> list[Good]:
        """What publishing `manifest` makes worthless: for one container every older
        checkpoint, for a pool its members beyond the cap or the age limit."""
        older = [
            m
            for m in self._same_member(manifest)
            if m.id != manifest.id and m.manifest.created_at <= manifest.created_at
        ]
        if not manifest.identity.pool:
            return older
        newest_first = sorted(
            self._listing.matching(manifest.identity), key=lambda m: m.manifest.created_at, reverse=True
        )
        now = time.time()
        return older + [
            m
            for i, m in enumerate(newest_first)
            if m.id != manifest.id and m not in older and (i >= POOL_CAP or now - m.manifest.created_at > POOL_TTL)
        ]

    def _same_member(self, manifest: Manifest) -> list[Good]:
        """The checkpoints `manifest` competes with: all of its identity's, or in a pool those
        of the same pod (each pod is one member; its newer checkpoint replaces its older)."""
        members = self._listing.matching(manifest.identity)
        if not manifest.identity.pool:
            return members
        return [m for m in members if m.manifest.identity.pod == manifest.identity.pod]

    def candidates(self, identity: Identity) -> list[Entry]:
        """The identity's usable checkpoints, newest first (a pool's members in the order to claim)."""
        found = sorted(self._listing.matching(identity), key=lambda m: m.manifest.created_at, reverse=True)
        return [m.entry for m in found]

    def discard(self, staging: str) -> None:
        with contextlib.suppress(OSError, ValueError), self.tree.at("staging") as sfd:
            safefs.remove_tree(sfd, self._staging_name(staging))

    def _staging_name(self, path: str) -> str:
        parent, name = os.path.split(os.path.normpath(path))
        if os.path.normpath(parent) != os.path.normpath(self.tree.dir("staging")):
            raise ValueError(f"{path} is not a staging folder of this store")
        return safefs.check_name(name)

    # -- pending markers ------------------------------------------------------------------------

    def mark_pending(self, identity: Identity, cid: str) -> None:
        self._pending.mark(identity, cid)
        if identity.key.startswith(WORKLOAD_PREFIX):
            # Tells the namespace's next pods that a workload of theirs may have checkpoints,
            # which only the pod's labels can find (see has_workloads).
            with self.tree.at("workloads", namespace_key(identity.namespace), create=True) as fd:
                safefs.write_file(fd, identity_key(identity), b"")

    def has_workloads(self, namespace: str) -> bool:
        """Whether any workload identity (a Job, a pod template) of `namespace` was ever
        checkpointed here: only then is a new pod's identity worth asking containerd for."""
        try:
            with self.tree.at("workloads", namespace_key(namespace)) as fd:
                return bool(os.listdir(fd))
        except OSError:
            return False

    def clear_pending(self, identity: Identity, cid: str) -> None:
        self._pending.clear(identity, cid)

    def is_pending(self, identity: Identity, *, now: float | None = None) -> bool:
        """A checkpoint of `identity` is being written by a live process (on any node)."""
        return self._pending.live(identity, time.time() if now is None else now)

    # -- listing --------------------------------------------------------------------------------

    def entries(self) -> Iterator[Entry]:
        """Every entry, bad ones included with their fault; nothing in the tree stops it."""
        return self._listing.entries()

    def published(self, identity: Identity) -> list[Entry]:
        """Every entry in the identity's folder, bad ones included (with their fault)."""
        return self._listing.published(identity)

    def latest(self, identity: Identity) -> Entry | None:
        """The newest readable published checkpoint of `identity` (its namespace included)."""
        return self._listing.latest(identity)

    def find(self, prefix: str) -> Entry | None:
        return self._listing.find(prefix)

    def problems(self) -> list[str]:
        """What is wrong with the layout itself (a state folder that is a link, say)."""
        return self._listing.problems()

    def reason(self, entry: Entry) -> str:
        """A quarantined entry's reason.txt (one line, bounded), or ""."""
        return self._listing.reason(entry)

    def size(self, entry: Entry) -> int:
        """Bytes stored (regular files only; nothing below the entry is followed)."""
        return self._listing.size(entry)

    # -- claiming -------------------------------------------------------------------------------

    def claim(self, entry: Entry) -> Entry | None:
        """Take `entry` for a restore; None when another restore got it first."""
        self.ensure()
        try:
            with self.tree.parent(entry) as pfd, self.tree.at("claimed") as cfd:
                if not safefs.describe(pfd, entry.id) == "a folder":
                    return None
                os.rename(entry.id, entry.id, src_dir_fd=pfd, dst_dir_fd=cfd)
                with safefs.opened_dir(cfd, entry.id) as fd:
                    safefs.write_file(fd, OWNER, owner_line().encode())
                mtime = safefs.mtime(cfd, entry.id)
        except OSError:
            return None
        target = os.path.join(self.tree.dir("claimed"), entry.id)
        return Entry("claimed", entry.id, target, entry.manifest, mtime=mtime)

    def release(self, entry: Entry, manifest: Manifest) -> Entry:
        """Give a claimed checkpoint back (with its attempt count updated)."""
        key = identity_key(manifest.identity)
        body = self._sealing.sign(manifest, self._sealing.opener(dataclasses.replace(entry, manifest=manifest)))
        with self.tree.parent(entry) as pfd:
            with safefs.opened_dir(pfd, entry.id) as fd:
                safefs.unlink(fd, OWNER)
                safefs.write_file(fd, MANIFEST, body, durable=True)
            with self.tree.at("checkpoints", key, create=True) as kfd:
                os.rename(entry.id, entry.id, src_dir_fd=pfd, dst_dir_fd=kfd)
        target = os.path.join(self.tree.dir("checkpoints"), key, entry.id)
        return Entry("checkpoints", entry.id, target, manifest, key=key, mtime=time.time())

    def quarantine(self, entry: Entry, reason: str, log_file: str = "") -> Entry:
        self.ensure()
        with self.tree.parent(entry) as pfd, self.tree.at("quarantine") as qfd:
            if safefs.describe(pfd, entry.id) != "a folder":
                raise UnsafeEntryError(entry.id, f"is {safefs.describe(pfd, entry.id)}, not a folder")
            os.rename(entry.id, entry.id, src_dir_fd=pfd, dst_dir_fd=qfd)
            with safefs.opened_dir(qfd, entry.id) as fd:
                stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                safefs.write_file(fd, REASON, f"{stamp} {one_line(reason)}\n".encode())
                if log_file and os.path.exists(log_file):
                    with contextlib.suppress(OSError), open(log_file, "rb") as f:
                        # The log is the shim's own (its work folder); only its copy goes in the store.
                        safefs.write_file(fd, "restore.log", f.read(16 << 20))
        target = os.path.join(self.tree.dir("quarantine"), entry.id)
        return Entry("quarantine", entry.id, target, entry.manifest, mtime=time.time())

    def remove(self, entry: Entry) -> None:
        """Remove an entry (a folder by descriptor; a link or file in its place is unlinked
        itself, never followed). Renamed out of the way first, so a half-removed checkpoint
        is never read."""
        doomed = f".rm-{entry.id}-{secrets.token_hex(4)}"
        with self.tree.parent(entry) as pfd:
            try:
                with self.tree.at("staging") as sfd:
                    os.rename(entry.id, doomed, src_dir_fd=pfd, dst_dir_fd=sfd)
                    safefs.remove_tree(sfd, doomed)
                    return
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno != errno.EXDEV and not isinstance(exc, UnsafeEntryError):
                    raise
            safefs.remove_tree(pfd, entry.id)

    def note_restore(self, entry: Entry, record: restores.Record) -> None:
        """Kept in the entry's folder: it goes where the entry goes (released, quarantined)."""
        with self.tree.of(entry) as fd:
            safefs.write_file(fd, restores.NAME, record.to_json())

    def restore_record(self, entry: Entry) -> restores.Record | None:
        try:
            with self.tree.of(entry) as fd:
                return restores.Record.from_json(safefs.read_file(fd, restores.NAME, restores.MAX_RECORD))
        except OSError:
            return None

    # -- reading stored files -------------------------------------------------------------------

    def restore_file(self, entry: Entry, rel: str, dst: str, *, cap: int | None = None) -> None:
        self._files.restore_file(entry, rel, dst, cap=cap)

    def file_reader(self, entry: Entry, rel: str, *, ahead: int = 0) -> archive.FileReader:
        return self._files.file_reader(entry, rel, ahead=ahead)

    def verify(self, entry: Entry) -> list[str]:
        return self._files.verify(entry)

    # -- retention ------------------------------------------------------------------------------

    def prune(
        self,
        *,
        max_age: float | None = None,
        max_bytes: int | None = None,
        now: float | None = None,
        grace: float = retention.GRACE,
    ) -> list[Entry]:
        """Remove abandoned, corrupt, expired and over-budget checkpoints (see `retention`);
        returns what was removed."""
        now = time.time() if now is None else now
        removed = retention.prune(self, max_age=max_age, max_bytes=max_bytes, now=now, grace=grace)
        self.collected = chunkgc.collect(self.tree, self.chunks, now=now)
        return removed

    def collect(self, *, now: float | None = None, min_age: float = chunkgc.MIN_AGE) -> tuple[int, int]:
        """Remove the chunks no checkpoint refers to (see chunkgc): (chunks, bytes) removed."""
        return chunkgc.collect(self.tree, self.chunks, now=now, min_age=min_age)

    def owner_alive(self, entry: Entry, now: float) -> bool:
        """Whether the process working on a staging or claimed folder may still be at it."""
        try:
            with self.tree.of(entry) as fd:
                host, pid = safefs.read_file(fd, OWNER, SMALL).decode().split()
                owner = int(pid)
        except (OSError, ValueError):
            # No owner file: a crash between steps. Old enough means abandoned.
            return now - entry.mtime < retention.ABANDONED
        if host != socket.gethostname():
            return now - entry.mtime < retention.ABANDONED
        return pid_alive(owner)


def namespace_key(namespace: str) -> str:
    """Where a namespace's workload markers are kept."""
    return hashlib.sha256(namespace.encode()).hexdigest()[:32]
