"""The object store: checkpoints in an S3 bucket, so that a pod restores on any node.

A `backend.Backend` with the directory store's semantics, built on what every S3 server
offers: a PUT is atomic, a LIST sees every PUT that returned, and a conditional PUT
(`If-None-Match: *`) has one winner. Layout below the URL's prefix::

    v1/chunks/<space>/<digest>              a chunk (as in the directory store)
    v1/checkpoints/<key>/<id>/manifest.json published when this is written, after its chunks
    v1/claimed/<id>                         a restore's claim: "<host> <pid> <since> <token>"
    v1/quarantine/<id>/reason.txt           set aside (restore.log beside it)
    v1/pending/<key>/<id>                   a checkpoint of the identity is being taken
    v1/restores/<id>                        what its last restore noted (`restores`)
    v1/writers/<id>                         a checkpoint's chunks are being written
    v1/workloads/<ns>/<key>                 as in the directory store
    v1/gc.lock                              a chunk collection is running (its token last)

A checkpoint's state is read from these objects: quarantined when it has a reason, claimed
when it has a claim, published otherwise. A claim is a conditional PUT, and the winner
then checks that the manifest is still there (a consumed checkpoint loses its manifest
before its claim). A checkpoint is removed manifest first, so half of one is never read.

Chunk collection cannot rename a chunk aside as the directory store does; instead it and
the writers exclude one another. A writer puts its `writers/` object, then looks for
`gc.lock`; a collection puts `gc.lock`, then looks for writers. Whichever comes second sees
the other: a writer waits for the collection to end, a collection with a live writer
removes nothing. Staging folders are local (`local`): only published objects are shared.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Iterator

from hotrestart.store import archive, chunkcache, chunkgc, restores, retention, safefs
from hotrestart.store.chunkcache import ChunkCache
from hotrestart.store.chunkcodec import IntegrityError
from hotrestart.store.chunks import DIGEST, SPACE, check
from hotrestart.store.chunkwrite import ChunkWriter
from hotrestart.store.entry import Entry, Fault, Good, identity_key
from hotrestart.store.listing import checked_manifest
from hotrestart.store.manifest import (
    MAX_CHUNK_STORED,
    MAX_MANIFEST,
    Identity,
    Manifest,
    ManifestError,
    UnsupportedManifestError,
)
from hotrestart.store.pending import marker_live
from hotrestart.store.s3 import Bucket, Location, Meta
from hotrestart.store.seal import KeyRing, Sealer
from hotrestart.store.sealing import Sealing
from hotrestart.store.store import POOL_CAP, POOL_TTL, WORKLOAD_PREFIX, namespace_key
from hotrestart.store.storedfiles import StoredFiles
from hotrestart.store.tree import MANIFEST, OWNER, REASON, SMALL, one_line, owner_line, pid_alive

log = logging.getLogger(__name__)

DEFAULT_LOCAL = "/var/lib/hotrestart/s3-staging"
LOCAL_ENV = "HOTRESTART_S3_STAGING"
GC_STALE = 600.0  # a gc.lock older than this (by the server's clock) is a dead collector's
GC_MAX = 300.0  # a collection stops removing chunks this long after taking the lock
WRITER_STALE = 300.0  # a writer object not renewed for this long is a dead writer's
LEASE_RENEW = 60.0  # a writer renews its object this often
IO_THREADS = 16
LOCK_KEY = "v1/gc.lock"
_MANIFEST_KEY = re.compile(r"v1/checkpoints/([0-9a-f]{32})/([A-Za-z0-9T._-]{1,128})/manifest\.json")


class ObjectStore:
    def __init__(self, url: str, *, keys: KeyRing | None = None, local: str = "", config_file: str = "") -> None:
        self.location = Location.parse(url)
        self.root = self.location.url
        self.bucket = Bucket(self.location, config_file)
        self.keys = keys
        self._sealing = Sealing(keys)
        self._local = local or os.environ.get(LOCAL_ENV, "") or DEFAULT_LOCAL
        self.collected = (0, 0)
        self.remote = True
        self._leases: dict[str, float] = {}  # staging id -> when its writer object was last put
        # Requests wait on the network, not the cores: many at once (16 chunks of at most
        # a few MiB each in memory).
        self.io_threads = IO_THREADS
        self.cache = chunkcache.from_env()
        if self.cache is None:
            self._files = StoredFiles(self._sealing, self._fetcher, self._discard, self.io_threads)
        else:
            self._files = StoredFiles(
                self._sealing, self._cached_reader, self._discard, self.io_threads, origin=self._fetcher
            )

    def sealer(self, cid: str) -> Sealer | None:
        return self._sealing.sealer(cid)

    def _path(self, key: str, cid: str) -> str:
        return f"{self.root}/v1/checkpoints/{key}/{cid}"

    # -- writing ------------------------------------------------------------------------------

    def new_staging(self) -> tuple[str, str]:
        os.makedirs(self._local, mode=0o700, exist_ok=True)
        self._sweep_staging()
        cid = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(6)
        path = os.path.join(self._local, cid)
        os.mkdir(path, 0o700)
        fd = os.open(os.path.join(path, OWNER), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, owner_line().encode())
        finally:
            os.close(fd)
        return cid, path

    def _sweep_staging(self) -> None:
        """Remove the staging folders of processes that are gone (a shim killed mid-write)."""
        for name in os.listdir(self._local):
            try:
                with open(os.path.join(self._local, name, OWNER), "rb") as f:
                    host, pid = f.read(SMALL).decode().split()[:2]
                if host == socket.gethostname() and not pid_alive(int(pid)):
                    shutil.rmtree(os.path.join(self._local, name), ignore_errors=True)
            except (OSError, ValueError):
                continue

    def _staging_name(self, path: str) -> str:
        parent, name = os.path.split(os.path.normpath(path))
        if os.path.normpath(parent) != os.path.normpath(self._local):
            raise ValueError(f"{path} is not a staging folder of this store")
        return safefs.check_name(name)

    def chunk_writer(self, staging: str) -> ChunkWriter:
        """Announce the writer (see the module's docstring), wait out a running collection,
        and return what stores chunks not in the bucket yet."""
        cid = self._staging_name(staging)
        mine = f"v1/writers/{cid}"
        deadline = time.monotonic() + GC_STALE
        while True:
            # Put (again) before every look: the object's time is the server's "now", and a
            # collection starting meanwhile must see it fresh.
            renewed = time.monotonic()
            self.bucket.put(mine, owner_line(time.time()).encode())
            me = self.bucket.head(mine)
            lock = self.bucket.head(LOCK_KEY)
            now = me.mtime if me is not None else time.time()
            if lock is None or now - lock.mtime > GC_STALE:
                break
            if time.monotonic() > deadline:
                raise OSError(f"{self.root}: a chunk collection is still running")
            time.sleep(0.5)
        self._leases[cid] = renewed
        sink = _BucketChunks(self.bucket, mine, self._leases, cid, self.cache)
        return ChunkWriter(sink, self._sealing.writing(), _NoJournal(), self.io_threads)

    def publish(self, staging: str, manifest: Manifest, sealer: Sealer | None = None) -> Entry | None:
        if any(e.manifest.created_at > manifest.created_at for e in self._same_member(manifest)):
            self.discard(staging)
            return None
        cid = self._staging_name(staging)
        key = identity_key(manifest.identity)
        safefs.check_name(manifest.id)
        body = self._sealing.sign(manifest, sealer)
        # Its chunks are safe from collection only while its writer object is fresh.
        renewed = self._leases.get(cid)
        if renewed is None or time.monotonic() - renewed > WRITER_STALE - LEASE_RENEW:
            self.discard(staging)
            raise OSError(f"{self.root}: checkpoint {manifest.id} not published: its writer's lease lapsed")
        if not self.bucket.create(f"v1/checkpoints/{key}/{manifest.id}/{MANIFEST}", body):
            raise FileExistsError(f"{self.root}: checkpoint {manifest.id} is published already")
        self.discard(staging)
        meta = self.bucket.head(f"v1/checkpoints/{key}/{manifest.id}/{MANIFEST}")
        mtime = meta.mtime if meta is not None else time.time()
        entry = Entry("checkpoints", manifest.id, self._path(key, manifest.id), manifest, key=key, mtime=mtime)
        for older in self._superseded(manifest):
            with contextlib.suppress(OSError):
                self.remove(older.entry)
        return entry

    def _superseded(self, manifest: Manifest) -> list[Good]:
        older = [
            m
            for m in self._same_member(manifest)
            if m.id != manifest.id and m.manifest.created_at <= manifest.created_at
        ]
        if not manifest.identity.pool:
            return older
        newest_first = sorted(self._matching(manifest.identity), key=lambda m: m.manifest.created_at, reverse=True)
        now = time.time()
        return older + [
            m
            for i, m in enumerate(newest_first)
            if m.id != manifest.id and m not in older and (i >= POOL_CAP or now - m.manifest.created_at > POOL_TTL)
        ]

    def _same_member(self, manifest: Manifest) -> list[Good]:
        members = self._matching(manifest.identity)
        if not manifest.identity.pool:
            return members
        return [m for m in members if m.manifest.identity.pod == manifest.identity.pod]

    def discard(self, staging: str) -> None:
        """Throw a staging folder away, and its writer object with it; never raises."""
        with contextlib.suppress(OSError, ValueError):
            cid = self._staging_name(staging)
            self._leases.pop(cid, None)
            shutil.rmtree(os.path.join(self._local, cid), ignore_errors=True)
            self.bucket.delete([f"v1/writers/{cid}"])

    # -- pending markers ------------------------------------------------------------------------

    def mark_pending(self, identity: Identity, cid: str) -> None:
        marker = f"v1/pending/{identity_key(identity)}/{safefs.check_name(cid)}"
        self.bucket.put(marker, owner_line(time.time()).encode())
        if identity.key.startswith(WORKLOAD_PREFIX):
            self.bucket.put(f"v1/workloads/{namespace_key(identity.namespace)}/{identity_key(identity)}", b"")

    def clear_pending(self, identity: Identity, cid: str) -> None:
        with contextlib.suppress(OSError):
            self.bucket.delete([f"v1/pending/{identity_key(identity)}/{safefs.check_name(cid)}"])

    def is_pending(self, identity: Identity, *, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        try:
            for meta in self.bucket.listing(f"v1/pending/{identity_key(identity)}/"):
                try:
                    live = marker_live(self.bucket.get(meta.key, SMALL), now)
                except FileNotFoundError:
                    continue
                except OSError:
                    live = False  # not a marker this store writes (too large, say)
                if live:
                    return True
                with contextlib.suppress(OSError):
                    self.bucket.delete([meta.key])
        except OSError:
            return False  # out of reach: nothing to wait for
        return False

    def has_workloads(self, namespace: str) -> bool:
        try:
            return next(self.bucket.listing(f"v1/workloads/{namespace_key(namespace)}/"), None) is not None
        except OSError:
            return False

    # -- listing --------------------------------------------------------------------------------

    def entries(self) -> Iterator[Entry]:
        """Every entry; none when the bucket cannot be listed (`problems` says why)."""
        try:
            manifests = list(self.bucket.listing("v1/checkpoints/"))
            claims = {m.key.removeprefix("v1/claimed/"): m for m in self.bucket.listing("v1/claimed/")}
            reasons = {
                m.key.removeprefix("v1/quarantine/").split("/")[0]: m
                for m in self.bucket.listing("v1/quarantine/")
                if m.key.endswith("/" + REASON)
            }
        except OSError as exc:
            log.warning("%s not listed: %s", self.root, exc)
            return
        seen: set[str] = set()
        for meta in sorted(manifests, key=lambda m: m.key):
            found = _MANIFEST_KEY.fullmatch(meta.key)
            if found is None:
                continue  # not an object this store writes
            key, cid = found.groups()
            seen.add(cid)
            entry = self._load(key, cid, meta, claims.get(cid), reasons.get(cid))
            if entry is not None:
                yield entry
        # A claim or reason left with no manifest: a restore or removal that died part-way.
        for state, markers in (("claimed", claims), ("quarantine", reasons)):
            for cid, meta in sorted(markers.items()):
                if cid not in seen and (state == "quarantine" or cid not in reasons):
                    seen.add(cid)
                    yield Entry(state, cid, f"{self.root}/v1/{state}/{cid}", None, None, "no manifest", "", meta.mtime)

    def _load(self, key: str, cid: str, meta: Meta, claim: Meta | None, reason: Meta | None) -> Entry | None:
        """The entry whose manifest object is `meta`, its manifest checked; None when it is gone."""
        state, mtime = "checkpoints", meta.mtime
        if reason is not None:
            state, mtime = "quarantine", reason.mtime
        elif claim is not None:
            state, mtime = "claimed", claim.mtime
        path = self._path(key, cid)
        manifest: Manifest | None = None
        fault: Fault | None = None
        problem = ""
        try:
            safefs.check_name(cid)
            manifest = checked_manifest(self.bucket.get(meta.key, MAX_MANIFEST), cid, key, self._sealing)
        except FileNotFoundError:
            return None  # removed since the listing
        except UnsupportedManifestError as exc:
            fault, problem = Fault.UNSUPPORTED, str(exc)
        except (ManifestError, safefs.UnsafeEntryError) as exc:
            fault, problem = Fault.CORRUPT, str(exc)
        except OSError as exc:
            fault, problem = Fault.UNREADABLE, f"could not be read: {exc.strerror or exc}"
        return Entry(state, cid, path, manifest, fault, problem, key, mtime)

    def published(self, identity: Identity) -> list[Entry]:
        key = identity_key(identity)
        found = []
        try:
            for meta in self.bucket.listing(f"v1/checkpoints/{key}/"):
                m = _MANIFEST_KEY.fullmatch(meta.key)
                if m is None or m.group(1) != key:
                    continue
                cid = m.group(2)
                claim = self.bucket.head(f"v1/claimed/{cid}")
                reason = self.bucket.head(f"v1/quarantine/{cid}/{REASON}")
                if claim is None and reason is None:
                    entry = self._load(key, cid, meta, None, None)
                    if entry is not None:
                        found.append(entry)
        except OSError as exc:
            log.warning("checkpoints of %s not listed: %s", identity.canonical(), exc)
            return []
        return sorted(found, key=lambda e: e.id)

    def _matching(self, identity: Identity) -> list[Good]:
        return [
            Good(e)
            for e in self.published(identity)
            if e.manifest is not None and e.manifest.identity.same(identity) and e.fault is None
        ]

    def latest(self, identity: Identity) -> Entry | None:
        best = max(self._matching(identity), key=lambda e: e.manifest.created_at, default=None)
        return best.entry if best is not None else None

    def candidates(self, identity: Identity) -> list[Entry]:
        found = sorted(self._matching(identity), key=lambda m: m.manifest.created_at, reverse=True)
        return [m.entry for m in found]

    def find(self, prefix: str) -> Entry | None:
        matches = [e for e in self.entries() if e.id.startswith(prefix)]
        return matches[0] if len(matches) == 1 else None

    def problems(self) -> list[str]:
        found = []
        for prefix in ("v1/checkpoints/", "v1/claimed/", "v1/quarantine/"):
            try:
                for _ in self.bucket.listing(prefix):
                    pass
            except OSError as exc:
                found.append(str(exc))
                break
        return found

    def reason(self, entry: Entry) -> str:
        try:
            return one_line(self.bucket.get(f"v1/quarantine/{entry.id}/{REASON}", SMALL).decode(errors="replace"))
        except OSError:
            return ""

    def size(self, entry: Entry) -> int:
        return entry.manifest.stored_bytes if entry.manifest is not None else 0

    def owner_alive(self, entry: Entry, now: float) -> bool:
        """Whether the restore holding a claimed entry may still be at it."""
        try:
            host, pid = self.bucket.get(f"v1/claimed/{entry.id}", SMALL).decode().split()[:2]
            owner = int(pid)
        except FileNotFoundError:
            return True  # released or removed since the listing: not this prune's to judge
        except (OSError, ValueError):
            return now - entry.mtime < retention.ABANDONED
        if host != socket.gethostname():
            return now - entry.mtime < retention.ABANDONED
        return pid_alive(owner)

    # -- claiming -------------------------------------------------------------------------------

    def claim(self, entry: Entry) -> Entry | None:
        if entry.manifest is None or not entry.key:
            return None
        mine = f"v1/claimed/{entry.id}"
        body = _claim_body()
        try:
            if not self.bucket.create(mine, body):
                return None
        except OSError as exc:
            log.warning("checkpoint %s not claimed: %s", entry.id, exc)
            self._drop_if_mine(mine, body)  # a claim that landed after all would hold it
            return None
        try:
            # Consumed (manifest gone) or set aside between the listing and the claim: not ours.
            manifest = self.bucket.head(f"v1/checkpoints/{entry.key}/{entry.id}/{MANIFEST}")
            fresh = None
            if manifest is not None and self.bucket.head(f"v1/quarantine/{entry.id}/{REASON}") is None:
                fresh = self._load(entry.key, entry.id, manifest, None, None)
            claimed = self.bucket.head(mine) if fresh is not None and fresh.manifest is not None else None
        except OSError as exc:
            log.warning("checkpoint %s not claimed: %s", entry.id, exc)
            claimed = None
        if claimed is None or fresh is None or fresh.manifest is None:
            with contextlib.suppress(OSError):
                self.bucket.delete([mine])  # never left holding what it did not get
            return None
        return Entry("claimed", entry.id, entry.path, fresh.manifest, key=entry.key, mtime=claimed.mtime)

    def _drop_if_mine(self, key: str, body: bytes) -> None:
        """Remove `key` if it holds `body`. A PUT still in flight and landing later cannot be
        helped: such a claim holds its checkpoint until this process is gone (`owner_alive`)."""
        with contextlib.suppress(OSError):
            if self.bucket.get(key, len(body)) == body:
                self.bucket.delete([key])

    def release(self, entry: Entry, manifest: Manifest) -> Entry:
        key = identity_key(manifest.identity)
        body = self._sealing.sign(manifest, self._sealing.opener(dataclasses.replace(entry, manifest=manifest)))
        if self.bucket.head(f"v1/claimed/{entry.id}") is None:
            # Taken for abandoned and removed meanwhile: its chunks may be gone too.
            raise FileNotFoundError(f"checkpoint {entry.id} was removed while claimed; not released")
        self.bucket.put(f"v1/checkpoints/{key}/{entry.id}/{MANIFEST}", body)
        self.bucket.delete([f"v1/claimed/{entry.id}"])
        return Entry("checkpoints", entry.id, self._path(key, entry.id), manifest, key=key, mtime=time.time())

    def quarantine(self, entry: Entry, reason: str, log_file: str = "") -> Entry:
        safefs.check_name(entry.id)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if log_file and os.path.exists(log_file):
            with contextlib.suppress(OSError), open(log_file, "rb") as f:
                self.bucket.put(f"v1/quarantine/{entry.id}/restore.log", f.read(16 << 20))
        self.bucket.put(f"v1/quarantine/{entry.id}/{REASON}", f"{stamp} {one_line(reason)}\n".encode())
        return Entry("quarantine", entry.id, entry.path, entry.manifest, key=entry.key, mtime=time.time())

    def remove(self, entry: Entry) -> None:
        """The manifest first: what is left after a failure part-way is never read. A
        published checkpoint is claimed first (FileExistsError when a restore holds it): one
        being restored elsewhere is never taken from under it."""
        safefs.check_name(entry.id)
        if entry.state == "checkpoints" and not self.bucket.create(f"v1/claimed/{entry.id}", _claim_body()):
            raise FileExistsError(f"checkpoint {entry.id} is being restored; not removed")
        if entry.key:
            self.bucket.delete([f"v1/checkpoints/{entry.key}/{entry.id}/{MANIFEST}"])
        self.bucket.delete(
            [
                f"v1/claimed/{entry.id}",
                f"v1/restores/{entry.id}",
                f"v1/quarantine/{entry.id}/restore.log",
                f"v1/quarantine/{entry.id}/{REASON}",
            ]
        )

    def note_restore(self, entry: Entry, record: restores.Record) -> None:
        self.bucket.put(f"v1/restores/{safefs.check_name(entry.id)}", record.to_json())

    def restore_record(self, entry: Entry) -> restores.Record | None:
        try:
            return restores.Record.from_json(self.bucket.get(f"v1/restores/{entry.id}", restores.MAX_RECORD))
        except OSError:
            return None

    # -- reading stored files -------------------------------------------------------------------

    def restore_file(self, entry: Entry, rel: str, dst: str, *, cap: int | None = None) -> None:
        self._files.restore_file(entry, rel, dst, cap=cap)

    def file_reader(self, entry: Entry, rel: str, *, ahead: int = 0) -> archive.FileReader:
        return self._files.file_reader(entry, rel, ahead=ahead)

    def verify(self, entry: Entry) -> list[str]:
        return self._files.verify(entry)

    def _fetcher(self, space: str) -> archive.ReadChunk:
        """Chunks from the bucket (a copy kept in the node's cache, when there is one)."""

        def fetch(digest: str, size: int) -> bytes:
            if not 0 < size <= MAX_CHUNK_STORED:
                raise IntegrityError(f"chunk {digest[:16]}: {size} bytes stored is out of range")
            check(space, digest)
            try:
                data = self.bucket.get_exact(_chunk_key(space, digest), size)
            except FileNotFoundError:
                raise IntegrityError(f"chunk {digest[:16]}: missing from the store") from None
            if data is None:
                raise IntegrityError(f"chunk {digest[:16]}: not the {size} bytes the manifest says")
            if self.cache is not None:
                self.cache.keep(space, digest, data)
            return data

        return fetch

    def _cached_reader(self, space: str) -> archive.ReadChunk:
        """Chunks from the node's cache, those it lacks from the bucket."""
        assert self.cache is not None
        cache, fetch = self.cache, self._fetcher(space)

        def read(digest: str, size: int) -> bytes:
            found = cache.get(space, digest, size)
            return found if found is not None else fetch(digest, size)

        return read

    def _discard(self, space: str, digest: str) -> None:
        """A chunk proven corrupt as the bucket holds it (a cached copy is fetched again
        first): removed, so the next checkpoint holding those bytes uploads it again."""
        check(space, digest)
        if self.cache is not None:
            self.cache.drop(space, digest)
        self.bucket.delete([_chunk_key(space, digest)])

    # -- retention ------------------------------------------------------------------------------

    def prune(
        self,
        *,
        max_age: float | None = None,
        max_bytes: int | None = None,
        now: float | None = None,
        grace: float = retention.GRACE,
    ) -> list[Entry]:
        now = time.time() if now is None else now
        removed = retention.prune(self, max_age=max_age, max_bytes=max_bytes, now=now, grace=grace)
        self.collected = self.collect(min_age=chunkgc.MIN_AGE)
        return removed

    def collect(self, *, min_age: float = chunkgc.MIN_AGE) -> tuple[int, int]:
        """Remove the chunks no manifest refers to (see the module's docstring): (chunks,
        bytes) removed. Never raises: a store it cannot read whole loses nothing."""
        token = secrets.token_hex(8)
        try:
            if not self._take_lock(token):
                log.info("chunks not collected: another collection is running")
                return 0, 0
            return self._collect(min_age, token)
        except (chunkgc.Unknown, OSError) as exc:
            log.warning("chunks not collected: %s", exc)
            return 0, 0
        finally:
            with contextlib.suppress(OSError):
                if self._lock_is(token):
                    self.bucket.delete([LOCK_KEY])

    def _take_lock(self, token: str) -> bool:
        """Create gc.lock with our token; take over one older than GC_STALE."""
        body = f"{owner_line().strip()} {token}\n".encode()
        if self.bucket.create(LOCK_KEY, body):
            return True
        lock = self.bucket.head(LOCK_KEY)
        probe = f"v1/clock/{token}"  # the server's "now", beside nothing a collection reads
        self.bucket.put(probe, b"")
        now = self.bucket.head(probe)
        self.bucket.delete([probe])
        if lock is not None and (now is None or now.mtime - lock.mtime <= GC_STALE):
            return False
        self.bucket.delete([LOCK_KEY])
        return self.bucket.create(LOCK_KEY, body)

    def _lock_is(self, token: str) -> bool:
        try:
            return self.bucket.get(LOCK_KEY, SMALL).decode(errors="replace").split()[-1:] == [token]
        except FileNotFoundError:
            return False

    def _live_writers(self, now: float) -> int:
        live = 0
        for meta in self.bucket.listing("v1/writers/"):
            if self._writer_gone(meta, now):
                with contextlib.suppress(OSError):
                    self.bucket.delete([meta.key])
            else:
                live += 1
        return live

    def _collect(self, min_age: float, token: str) -> tuple[int, int]:
        started = time.monotonic()
        lock = self.bucket.head(LOCK_KEY)
        if lock is None or not self._lock_is(token):
            return 0, 0
        now = lock.mtime  # the server's clock, as every age here
        live = self._live_writers(now)
        if live:
            log.info("chunks not collected: %d checkpoint(s) being written", live)
            return 0, 0
        refs: set[chunkgc.Ref] = set()
        for meta in self.bucket.listing("v1/checkpoints/"):
            if not meta.key.endswith("/" + MANIFEST):
                continue
            try:
                refs |= chunkgc.manifest_refs(self.bucket.get(meta.key, MAX_MANIFEST))
            except FileNotFoundError:
                continue  # removed since the listing
        doomed: list[tuple[str, int]] = []
        for meta in self.bucket.listing("v1/chunks/"):
            parts = meta.key.split("/")
            if len(parts) != 4 or not SPACE.fullmatch(parts[2]) or not DIGEST.fullmatch(parts[3]):
                continue
            if (parts[2], parts[3]) not in refs and now - meta.mtime >= min_age:
                doomed.append((meta.key, meta.size))
        removed, freed = 0, 0
        for i in range(0, len(doomed), 500):
            if time.monotonic() - started > GC_MAX:
                log.info("chunk collection stopped after %.0fs; the rest at the next prune", GC_MAX)
                break
            # Still ours, and still no writer: one that started meanwhile waits for the lock,
            # so only a lock taken over (ours thought stale) could let one in.
            if not self._lock_is(token) or self._live_writers(now):
                log.info("chunk collection stopped: the lock was taken over or a writer began")
                break
            batch = doomed[i : i + 500]
            self.bucket.delete([k for k, _ in batch])
            removed += len(batch)
            freed += sum(n for _, n in batch)
        return removed, freed

    def _writer_gone(self, meta: Meta, now: float) -> bool:
        """Whether a writer object is a dead writer's: not renewed in time, or of a process
        of this host that is gone (a shim killed mid-write, a PUT applied after it gave up)."""
        if now - meta.mtime > WRITER_STALE:
            return True
        try:
            host, pid = self.bucket.get(meta.key, SMALL).decode().split()[:2]
            return host == socket.gethostname() and not pid_alive(int(pid))
        except FileNotFoundError:
            return True
        except (OSError, ValueError):
            return False


class _BucketChunks:
    """A ChunkWriter's sink: chunks as objects, durable when their PUT returns. It renews
    its writer object while it writes, and gives up when it could not renew in time (a
    collection may then have taken it for dead); `publish` checks the same lease."""

    def __init__(
        self, bucket: Bucket, marker: str, leases: dict[str, float], cid: str, cache: ChunkCache | None
    ) -> None:
        self._bucket = bucket
        self._cache = cache
        self._marker = marker
        self._leases = leases
        self._cid = cid
        self._lock = threading.Lock()

    def renew(self) -> None:
        with self._lock:
            since = time.monotonic() - self._leases.get(self._cid, 0.0)
            if since < LEASE_RENEW:
                return
            if since > WRITER_STALE - LEASE_RENEW:
                raise OSError(f"{self._marker}: not renewed for {since:.0f}s; a collection may have run")
            renewed = time.monotonic()  # before the PUT: the server's time can only be later
            self._bucket.put(self._marker, owner_line(time.time()).encode())
            self._leases[self._cid] = renewed

    def stored_size(self, space: str, digest: str) -> int | None:
        self.renew()
        check(space, digest)
        meta = self._bucket.head(_chunk_key(space, digest))
        if meta is None or not 0 < meta.size <= MAX_CHUNK_STORED:
            return None
        return meta.size

    def put(self, space: str, digest: str, data: bytes) -> None:
        self.renew()
        check(space, digest)
        self._bucket.put(_chunk_key(space, digest), data)
        if self._cache is not None:  # restored here next, most likely
            self._cache.keep(space, digest, data)

    def sync(self, space: str, fans: set[str]) -> None:
        pass  # a PUT that returned is durable


class _NoJournal:
    """The writer's object stands for the journal here (see the module's docstring)."""

    def add(self, space: str, digest: str) -> None:
        pass

    def close(self) -> None:
        pass


def _claim_body() -> bytes:
    """A claim: "<host> <pid> <since> <token>", the token so that a claimer can tell its own
    claim from another's when the answer to its PUT was lost (`Bucket.create`)."""
    return f"{owner_line(time.time()).strip()} {secrets.token_hex(8)}\n".encode()


def _chunk_key(space: str, digest: str) -> str:
    return f"v1/chunks/{space}/{digest}"
