"""The object store backend against a real Ceph RADOS Gateway (hack/object-store.sh).

The same semantics as the directory store: whole checkpoints or nothing, one claim winner
across clients, dedup against what the bucket holds, collection that never takes a chunk
in use, and clear errors (nothing visible, nothing lost) for a gateway that hangs, wrong
credentials and a missing bucket.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blake3
import pytest

import objstore
from hotrestart.store import archive, chunkcache, chunking
from hotrestart.store.chunkcodec import Codec, IntegrityError
from hotrestart.store.chunkwrite import ChunkWriter
from hotrestart.store.entry import Entry
from hotrestart.store.manifest import Identity, Manifest
from hotrestart.store.objectstore import ObjectStore
from hotrestart.store.seal import KeyRing

IDENT = Identity("ns", "web-0", "app")
CHUNK = 256 << 10


@pytest.fixture
def env(s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[dict[str, str]]:
    for name, value in s3_env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HOTRESTART_S3_TIMEOUT", "4")
    monkeypatch.setenv(chunkcache.DIR_ENV, str(tmp_path / "chunk-cache"))
    yield s3_env


def _store(env: dict[str, str], tmp: Path, url: str = "", keys: KeyRing | None = None) -> ObjectStore:
    return ObjectStore(url or objstore.fresh_url(env), keys=keys, local=str(tmp / "staging"))


def _publish(store: ObjectStore, tmp: Path, payload: bytes, ident: Identity = IDENT) -> tuple[Entry | None, int]:
    """Publish `payload` as one page image; (entry, bytes uploaded)."""
    cid, staging = store.new_staging()
    src = tmp / f"raw-{cid}"
    src.write_bytes(payload)
    writer = store.chunk_writer(staging)
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            fe = writer.store_file(str(src), "images/pages-1.img", chunking.fixed(len(payload), CHUNK), pool)
        writer.finish()
    except BaseException:
        store.discard(staging)
        raise
    finally:
        writer.close()
        src.unlink()
    manifest = Manifest(
        id=cid,
        identity=ident,
        created_at=time.time(),
        node="n1",
        reason="stop",
        image=blake3.blake3(payload).hexdigest(),
        spec_digest="d",
        runtime={},
        network={},
        files=[fe],
        timings={},
        space=writer.space,
        new_bytes=writer.new_bytes,
    )
    return store.publish(staging, manifest, store.sealer(cid)), writer.new_bytes


def _restored(store: ObjectStore, entry: Entry, tmp: Path) -> bytes:
    out = tmp / f"out-{entry.id}-{threading.get_ident()}"
    try:
        store.restore_file(entry, "images/pages-1.img", str(out))
        return out.read_bytes()
    finally:
        out.unlink(missing_ok=True)


def test_a_checkpoint_round_trips_and_a_second_one_uploads_only_what_changed(
    env: dict[str, str], tmp_path: Path
) -> None:
    store = _store(env, tmp_path)
    payload = os.urandom(4 << 20)
    first, uploaded = _publish(store, tmp_path, payload)
    assert first is not None and uploaded >= len(payload)
    changed = bytearray(payload)
    changed[: 1 << 10] = os.urandom(1 << 10)  # one chunk of sixteen
    second, uploaded = _publish(store, tmp_path, bytes(changed))
    assert second is not None and 0 < uploaded <= 2 * CHUNK
    assert [e.id for e in store.entries()] == [second.id]  # the older one is superseded
    latest = store.latest(IDENT)
    assert latest is not None and latest.id == second.id
    claimed = store.claim(latest)
    assert claimed is not None and claimed.state == "claimed"
    assert store.latest(IDENT) is None  # claimed: no other restore sees it
    assert _restored(store, claimed, tmp_path) == bytes(changed)
    assert store.verify(claimed) == []
    released = store.release(claimed, claimed.manifest)  # type: ignore[arg-type]
    assert store.latest(IDENT) is not None and released.state == "checkpoints"
    again = store.claim(released)
    assert again is not None
    store.quarantine(again, "restored process died")
    [entry] = list(store.entries())
    assert entry.state == "quarantine" and store.reason(entry).endswith("restored process died")
    assert store.latest(IDENT) is None and store.claim(entry) is None


def test_exactly_one_of_many_concurrent_claimers_wins(env: dict[str, str], tmp_path: Path) -> None:
    """Eight clients (each its own connection pool, as eight nodes) race for each checkpoint."""
    url = objstore.fresh_url(env)
    writer = _store(env, tmp_path, url)
    clients = [_store(env, tmp_path / f"n{i}", url) for i in range(8)]
    for round_ in range(6):
        entry, _ = _publish(writer, tmp_path, os.urandom(64 << 10), Identity("ns", f"p{round_}", "c"))
        assert entry is not None
        start = threading.Barrier(len(clients))

        def race(client: ObjectStore, entry: Entry = entry, start: threading.Barrier = start) -> bool:
            start.wait()
            return client.claim(entry) is not None

        with concurrent.futures.ThreadPoolExecutor(len(clients)) as pool:
            wins = list(pool.map(race, clients))
        assert wins.count(True) == 1, wins


def test_a_conditional_put_whose_answer_was_lost_is_settled_by_reading_back(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client's retry of a PUT that had landed is refused (412), and a timeout says
    nothing: the claimer reads the object back and keeps what is its own, and only that."""
    import obstore
    import obstore.exceptions

    store = _store(env, tmp_path)
    bucket = store.bucket
    assert bucket.create("v1/probe/a", b"mine 1")
    assert bucket.create("v1/probe/a", b"mine 1"), "a refused retry of our own PUT: ours"
    assert not bucket.create("v1/probe/a", b"mine 2"), "someone else's"
    assert not bucket.create("v1/probe/a", b"mine"), "someone else's, larger than ours"

    entry, _ = _publish(store, tmp_path, os.urandom(64 << 10))
    assert entry is not None
    real_put = obstore.put

    def landed_then_lost(*args: Any, **kwargs: Any) -> Any:
        real_put(*args, **kwargs)
        raise obstore.exceptions.GenericError("the connection was reset")

    monkeypatch.setattr(obstore, "put", landed_then_lost)
    assert bucket.create("v1/probe/b", b"mine 3"), "a timeout after the PUT landed: ours"
    assert not bucket.create("v1/probe/b", b"mine 4")
    claimed = store.claim(entry)
    assert claimed is not None, "the claim landed, its answer lost: still ours"
    assert store.claim(entry) is None, "and no one else's"
    monkeypatch.setattr(obstore, "put", real_put)
    store.remove(claimed)
    bucket.delete(["v1/probe/a", "v1/probe/b"])
    assert list(store.entries()) == []


def test_a_claim_loses_to_a_consumed_checkpoint(env: dict[str, str], tmp_path: Path) -> None:
    """A restorer that listed a checkpoint before another consumed it does not get it."""
    store = _store(env, tmp_path)
    entry, _ = _publish(store, tmp_path, os.urandom(64 << 10))
    assert entry is not None
    other = store.claim(entry)
    assert other is not None
    store.remove(other)
    assert store.claim(entry) is None
    assert list(store.entries()) == []


def test_collection_keeps_every_chunk_in_use_under_concurrent_writers_and_restores(
    env: dict[str, str], tmp_path: Path
) -> None:
    url = objstore.fresh_url(env)
    blocks = [os.urandom(CHUNK) for _ in range(10)]
    idents = [Identity("ns", f"p{i}", "c") for i in range(3)]
    stop = threading.Event()
    failures: list[str] = []
    restored = [0]
    collected = [0]

    def writer(n: int) -> None:
        store = _store(env, tmp_path / f"w{n}", url)
        (tmp_path / f"w{n}").mkdir()
        r = __import__("random").Random(n)
        while not stop.is_set():
            payload = b"".join(r.choice(blocks) for _ in range(r.randint(1, 4)))
            try:
                _publish(store, tmp_path / f"w{n}", payload, r.choice(idents))
            except Exception as exc:
                failures.append(f"publish: {exc!r}")

    def restorer(n: int) -> None:
        store = _store(env, tmp_path / f"r{n}", url)
        (tmp_path / f"r{n}").mkdir()
        r = __import__("random").Random(100 + n)
        while not stop.is_set():
            entry = store.latest(r.choice(idents))
            claimed = store.claim(entry) if entry is not None else None
            if claimed is None or claimed.manifest is None:
                continue
            try:
                if blake3.blake3(_restored(store, claimed, tmp_path)).hexdigest() != claimed.manifest.image:
                    failures.append(f"{claimed.id}: restored bytes differ")
                restored[0] += 1
            except archive.IntegrityError as exc:
                failures.append(f"{claimed.id}: {exc}")
            if r.random() < 0.5:
                store.release(claimed, claimed.manifest)
            else:
                store.remove(claimed)

    def collector() -> None:
        store = _store(env, tmp_path / "gc", url)
        while not stop.is_set():
            collected[0] += store.collect(min_age=0)[0]

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    threads += [threading.Thread(target=restorer, args=(i,)) for i in range(2)]
    threads += [threading.Thread(target=collector)]
    for t in threads:
        t.start()
    time.sleep(8)
    deadline = time.monotonic() + 60  # a loaded machine: enough restores to have raced the collector
    while restored[0] <= 5 and time.monotonic() < deadline and not failures:
        time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join()
    assert not failures, failures[:5]
    assert restored[0] > 5, (restored, collected)
    store = _store(env, tmp_path, url)
    for entry in store.entries():
        if entry.manifest is not None:
            assert store.verify(entry) == [], entry.id
    # With no writer left, what nothing refers to goes.
    for entry in list(store.entries()):
        store.remove(entry)
    time.sleep(1.1)  # a collection's clock is gc.lock's Last-Modified: whole seconds
    assert store.collect(min_age=0)[0] > 0
    assert list(store.bucket.listing("v1/chunks/")) == []


def test_a_gateway_that_hangs_mid_upload_leaves_nothing_visible(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _store(env, tmp_path)
    payload = os.urandom(8 << 20)
    put = store.bucket.put
    uploaded = [0]
    frozen = threading.Event()

    def put_then_freeze(key: str, data: bytes) -> None:
        put(key, data)
        if key.startswith("v1/chunks/"):
            uploaded[0] += 1
            if uploaded[0] == 4 and not frozen.is_set():
                frozen.set()
                os.kill(objstore.gateway_pid(), signal.SIGSTOP)

    monkeypatch.setattr(store.bucket, "put", put_then_freeze)
    t0 = time.monotonic()
    try:
        with pytest.raises(OSError):
            _publish(store, tmp_path, payload)
    finally:
        os.kill(objstore.gateway_pid(), signal.SIGCONT)
    assert frozen.is_set() and time.monotonic() - t0 < 40
    assert list(store.entries()) == []
    assert store.latest(IDENT) is None
    # Its chunks are garbage once no writer is at work: a prune removes them.
    assert list(store.bucket.listing("v1/writers/")) == []
    time.sleep(1.1)  # PUTs the frozen gateway took in apply when it resumes; whole seconds
    store.prune()
    store.collect(min_age=0)
    assert list(store.bucket.listing("v1/chunks/")) == []


def test_a_gateway_that_hangs_mid_download_fails_the_restore(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _store(env, tmp_path)
    entry, _ = _publish(store, tmp_path, os.urandom(8 << 20))
    assert entry is not None
    monkeypatch.setenv(chunkcache.BYTES_ENV, "0")  # another node's restore: nothing cached
    store = _store(env, tmp_path, store.root)
    assert store.cache is None
    claimed = store.claim(entry)
    assert claimed is not None
    with objstore.gateway_stopped():
        t0 = time.monotonic()
        with pytest.raises(OSError):
            _restored(store, claimed, tmp_path)
        assert time.monotonic() - t0 < 40
    assert not list(tmp_path.glob("out-*"))
    # The checkpoint itself is intact for the next attempt.
    assert _restored(store, claimed, tmp_path)


def test_wrong_credentials_and_a_missing_bucket_are_clear_errors(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = ObjectStore("s3://no-such-bucket-hr/x", local=str(tmp_path / "a"))
    _, staging = missing.new_staging()
    with pytest.raises(FileNotFoundError, match="NoSuchBucket"):
        missing.chunk_writer(staging)
    assert missing.latest(IDENT) is None and missing.problems()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    wrong = _store(env, tmp_path)
    _, staging = wrong.new_staging()
    with pytest.raises(PermissionError, match="SignatureDoesNotMatch"):
        wrong.chunk_writer(staging)
    assert wrong.latest(IDENT) is None and wrong.problems()


def test_credentials_from_a_shared_credentials_file(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "credentials"
    key_id, secret = env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    creds.write_text(f"[ci]\naws_access_key_id = {key_id}\naws_secret_access_key = {secret}\n")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_PROFILE", "ci")
    store = _store(env, tmp_path)
    entry, _ = _publish(store, tmp_path, os.urandom(64 << 10))
    assert entry is not None and store.latest(IDENT) is not None


def test_with_a_store_key_chunks_are_sealed_and_a_keyless_node_cannot_restore(
    env: dict[str, str], tmp_path: Path
) -> None:
    url = objstore.fresh_url(env)
    sealed = _store(env, tmp_path, url, keys=KeyRing([("k1", os.urandom(32))]))
    payload = b"secret page " * 50000
    entry, _ = _publish(sealed, tmp_path, payload)
    assert entry is not None and entry.manifest is not None and entry.manifest.seal
    for meta in sealed.bucket.listing("v1/chunks/"):
        assert b"secret page" not in sealed.bucket.get(meta.key, 1 << 30)
    keyless = _store(env, tmp_path, url)
    assert keyless.latest(IDENT) is None
    with pytest.raises(IntegrityError):
        keyless.restore_file(entry, "images/pages-1.img", str(tmp_path / "x"))
    assert _restored(sealed, entry, tmp_path) == payload


def test_doctor_says_whether_the_store_is_reachable_writable_and_keyed(env: dict[str, str]) -> None:
    from hotrestart import doctor

    ok = {c.name: c for c in doctor.store_checks(objstore.fresh_url(env), "", True)}
    assert all(c.ok for c in ok.values()), ok
    assert ok["chunk cache"].detail.startswith(os.environ[chunkcache.DIR_ENV]), ok
    missing = doctor.store_checks("s3://no-such-bucket-hr/x")
    assert not missing[0].ok and "NoSuchBucket" in missing[0].detail
    key = {c.name: c for c in missing}["store key"]
    assert not key.ok and "shared" in key.detail


def test_the_runtime_s3_config_file_alone_reaches_the_store(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "s3-config"
    conf.write_text(
        f"[default]\naws_access_key_id = {env['AWS_ACCESS_KEY_ID']}\n"
        f"aws_secret_access_key = {env['AWS_SECRET_ACCESS_KEY']}\n"
        f"region = {env['AWS_REGION']}\nendpoint_url = {env['AWS_ENDPOINT_URL']}\n"
    )
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION"):
        monkeypatch.delenv(name)
    store = ObjectStore(objstore.fresh_url(env), local=str(tmp_path / "staging"), config_file=str(conf))
    entry, _ = _publish(store, tmp_path, os.urandom(64 << 10))
    assert entry is not None and store.latest(IDENT) is not None


def test_retention_and_prune_on_the_object_store(env: dict[str, str], tmp_path: Path) -> None:
    store = _store(env, tmp_path)
    old, _ = _publish(store, tmp_path, os.urandom(256 << 10), Identity("ns", "old", "c"))
    new, _ = _publish(store, tmp_path, os.urandom(256 << 10), Identity("ns", "new", "c"))
    left, _ = _publish(store, tmp_path, os.urandom(256 << 10), Identity("ns", "left", "c"))
    assert old is not None and new is not None and left is not None and old.manifest is not None
    # A claim whose restorer is gone (a pid of this host that no longer runs) is abandoned.
    store.bucket.put(f"v1/claimed/{left.id}", f"{socket.gethostname()} {2**22 - 1} {time.time()}\n".encode())
    # Expired by age: only the one created before the cut.
    removed = store.prune(max_age=time.time() - old.manifest.created_at - 0.001)
    assert {e.id for e in removed} >= {old.id, left.id}
    assert [e.id for e in store.entries()] == [new.id]
    # Over the size budget: the oldest go first, until it fits.
    removed = store.prune(max_bytes=0)
    assert [e.id for e in removed] == [new.id] and list(store.entries()) == []
    time.sleep(1.1)  # a collection's clock is gc.lock's Last-Modified: whole seconds
    assert store.collect(min_age=0)[0] > 0
    assert list(store.bucket.listing("v1/chunks/")) == []


def test_a_restore_record_lives_and_goes_with_its_checkpoint(env: dict[str, str], tmp_path: Path) -> None:
    from hotrestart.store.restores import Record

    store = _store(env, tmp_path)
    entry, _ = _publish(store, tmp_path, os.urandom(64 << 10))
    assert entry is not None
    claimed = store.claim(entry)
    assert claimed is not None
    store.note_restore(claimed, Record("node-b", time.time(), lazy=True, resident_after=1.5))
    record = store.restore_record(claimed)
    assert record is not None and record.lazy and record.resident_after == 1.5
    store.remove(claimed)
    assert store.restore_record(claimed) is None
    assert list(store.bucket.listing("v1/restores/")) == []


def test_a_checkpoint_being_restored_elsewhere_is_never_removed_from_under_it(
    env: dict[str, str], tmp_path: Path
) -> None:
    url = objstore.fresh_url(env)
    here, there = _store(env, tmp_path / "a", url), _store(env, tmp_path / "b", url)
    old, _ = _publish(here, tmp_path, os.urandom(64 << 10))
    assert old is not None
    listed = there.latest(IDENT)
    assert listed is not None
    claimed = here.claim(old)  # another node restores it
    assert claimed is not None
    with pytest.raises(FileExistsError):
        there.remove(listed)  # as a prune or a newer checkpoint would
    newer, _ = _publish(there, tmp_path, os.urandom(64 << 10))  # supersedes the older: not this one
    assert newer is not None
    assert here.restore_record(claimed) is None and here.verify(claimed) == []
    assert {e.id: e.state for e in here.entries()} == {old.id: "claimed", newer.id: "checkpoints"}


def test_a_writer_whose_lease_lapsed_publishes_nothing(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stalled for minutes while writing chunks, or between its last chunk and its manifest:
    a collection may have taken it for dead, so it must not publish."""
    store = _store(env, tmp_path)
    real_writer, real_publish = store.chunk_writer, store.publish

    def stalled_writer(staging: str) -> ChunkWriter:
        writer = real_writer(staging)
        store._leases[os.path.basename(staging)] -= 1000
        return writer

    def stalled_publish(staging: str, manifest: Manifest, sealer: Any = None) -> Entry | None:
        store._leases[os.path.basename(staging)] -= 1000
        return real_publish(staging, manifest, sealer)

    monkeypatch.setattr(store, "chunk_writer", stalled_writer)
    with pytest.raises(OSError, match="not renewed for"):
        _publish(store, tmp_path, os.urandom(64 << 10))
    monkeypatch.setattr(store, "chunk_writer", real_writer)
    monkeypatch.setattr(store, "publish", stalled_publish)
    with pytest.raises(OSError, match="lease lapsed"):
        _publish(store, tmp_path, os.urandom(64 << 10))
    assert list(store.entries()) == [] and list(store.bucket.listing("v1/writers/")) == []


def _cached(store: ObjectStore) -> dict[str, Path]:
    assert store.cache is not None and store.cache.flush(30), "copies written behind, in time"
    return {p.name: p for p in Path(store.cache.root).glob("v1/chunks/*/*/*") if not p.name.startswith(".")}


def test_the_node_cache_serves_a_restore_here_and_a_bad_copy_is_fetched_again(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _store(env, tmp_path)
    payload = os.urandom(4 << 20)
    entry, _ = _publish(store, tmp_path, payload)
    assert entry is not None and entry.manifest is not None
    digests = {c.digest for c in entry.manifest.files[0].chunks}
    assert set(_cached(store)) == digests, "every chunk uploaded is kept on the node"
    # Served from the node's disk: a gateway that answers nothing does not hold it up.
    with objstore.gateway_stopped():
        t0 = time.monotonic()
        assert _restored(store, entry, tmp_path) == payload
        assert time.monotonic() - t0 < 2
    # A copy spoiled here (a torn write, a bad disk) is fetched again, and the bucket's
    # good one is left alone.
    spoiled = _cached(store)[entry.manifest.files[0].chunks[3].digest]
    spoiled.write_bytes(os.urandom(spoiled.stat().st_size))
    assert _restored(store, entry, tmp_path) == payload
    assert store.verify(entry) == []
    assert store.cache is not None and store.cache.flush(30)
    assert spoiled.read_bytes() == store.bucket.get_exact(f"v1/chunks/plain/{spoiled.name}", spoiled.stat().st_size)
    # Another node: nothing cached, everything from the bucket, which it then keeps too.
    monkeypatch.setenv(chunkcache.DIR_ENV, str(tmp_path / "other-node"))
    other = _store(env, tmp_path, store.root)
    assert not _cached(other)
    assert _restored(other, entry, tmp_path) == payload
    assert set(_cached(other)) == digests


def test_a_chunk_bad_in_the_bucket_too_is_removed_from_both(env: dict[str, str], tmp_path: Path) -> None:
    store = _store(env, tmp_path)
    entry, _ = _publish(store, tmp_path, os.urandom(2 << 20))
    assert entry is not None and entry.manifest is not None
    chunk = entry.manifest.files[0].chunks[1]
    key = f"v1/chunks/plain/{chunk.digest}"
    # A whole frame of other bytes, of the same size: it decodes, and does not match its name.
    other = Codec().encode(chunk.digest, os.urandom(chunk.raw))
    assert len(other) == chunk.stored
    store.bucket.put(key, other)
    _cached(store)[chunk.digest].write_bytes(other)
    with pytest.raises(archive.CorruptChunk):
        _restored(store, entry, tmp_path)
    assert chunk.digest not in _cached(store)
    assert store.bucket.head(key) is None
