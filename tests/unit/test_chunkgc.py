"""Chunk collection: unreferenced chunks go, referenced ones never, even with writers and restores at work."""

from __future__ import annotations

import json
import os
import random
import threading
import time
from pathlib import Path

import blake3
import pytest
from storekit import store_file

from hotrestart.store import archive
from hotrestart.store.chunks import DOOMED
from hotrestart.store.manifest import Identity, Manifest
from hotrestart.store.store import Store

BLOCK = 4096


def _publish(store: Store, tmp: Path, payload: bytes, ident: Identity) -> str:
    cid, staging = store.new_staging()
    src = tmp / f"raw-{cid}"
    src.write_bytes(payload)
    writer = store.chunk_writer(staging)
    try:
        entry = store_file(writer, src, "images/pages-1.img.zst", chunk=BLOCK)
        writer.finish()
    finally:
        writer.close()
    src.unlink()
    manifest = Manifest(
        id=cid,
        identity=ident,
        created_at=time.time(),
        node="n1",
        reason="stop",
        image=blake3.blake3(payload).hexdigest(),  # what a restore must get back
        spec_digest="d",
        runtime={},
        network={},
        files=[entry],
        timings={},
        space=writer.space,
        new_bytes=writer.new_bytes,
    )
    store.publish(staging, manifest)
    return cid


def _chunk_count(store: Store) -> int:
    return sum(1 for _ in store.chunks.listing())


def test_unreferenced_chunks_go_once_old_enough_and_referenced_ones_stay(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    a, b = Identity("ns", "a", "c"), Identity("ns", "b", "c")
    shared = os.urandom(BLOCK)
    _publish(store, tmp_path, shared + os.urandom(BLOCK), a)
    _publish(store, tmp_path, shared + os.urandom(BLOCK), b)
    assert _chunk_count(store) == 3
    _publish(store, tmp_path, shared + os.urandom(BLOCK), a)  # supersedes a's first
    assert _chunk_count(store) == 4
    assert store.collect(min_age=3600) == (0, 0), "young chunks are never collected"
    removed, freed = store.collect(min_age=0)
    assert removed == 1 and freed > BLOCK // 2
    assert _chunk_count(store) == 3
    for ident in (a, b):
        entry = store.latest(ident)
        assert entry is not None and store.verify(entry) == []


def test_a_checkpoint_being_written_keeps_its_chunks_through_its_journal(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    ident = Identity("ns", "a", "c")
    payload = os.urandom(2 * BLOCK)
    _publish(store, tmp_path, payload, ident)
    old = store.latest(ident)
    assert old is not None
    _cid, staging = store.new_staging()
    src = tmp_path / "raw"
    src.write_bytes(payload)
    writer = store.chunk_writer(staging)
    store_file(writer, src, "images/pages-1.img.zst", chunk=BLOCK)
    assert writer.new_bytes == 0, "every chunk was in the store already"
    store.remove(old)  # nothing published refers to the chunks now, only the journal
    assert store.collect(min_age=0) == (0, 0)
    assert _chunk_count(store) == 2
    writer.close()
    store.discard(staging)
    assert store.collect(min_age=0)[0] == 2


def test_a_manifest_of_an_unknown_schema_stops_collection(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    ident = Identity("ns", "a", "c")
    _publish(store, tmp_path, os.urandom(BLOCK), ident)
    entry = store.latest(ident)
    assert entry is not None
    _publish(store, tmp_path, os.urandom(BLOCK), Identity("ns", "b", "c"))
    newer = store.latest(Identity("ns", "b", "c"))
    assert newer is not None
    data = json.loads((Path(newer.path) / "manifest.json").read_text())
    data["schema"] = "hotrestart.io/checkpoint/v9"
    (Path(newer.path) / "manifest.json").write_text(json.dumps(data))
    store.remove(entry)
    assert store.collect(min_age=0) == (0, 0), "what a newer writer's manifest refers to cannot be told"


def test_a_restore_reads_a_chunk_that_collection_set_aside(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    ident = Identity("ns", "a", "c")
    payload = os.urandom(BLOCK)
    _publish(store, tmp_path, payload, ident)
    entry = store.latest(ident)
    assert entry is not None and entry.manifest is not None
    [chunk] = entry.manifest.files[0].chunks
    assert store.chunks.doom(entry.manifest.space, chunk.digest)
    assert store.chunks.stored_size(entry.manifest.space, chunk.digest) is None, "a writer writes it again"
    store.restore_file(entry, entry.manifest.files[0].path, str(tmp_path / "out"))
    assert (tmp_path / "out").read_bytes() == payload
    store.chunks.spare(entry.manifest.space, chunk.digest)
    fan = tmp_path / "s" / "v1" / "chunks" / entry.manifest.space / chunk.digest[:2]
    assert [p.name for p in fan.iterdir()] == [chunk.digest]


def test_one_collection_at_a_time(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    _publish(store, tmp_path, os.urandom(BLOCK), Identity("ns", "a", "c"))
    (tmp_path / "s" / "v1" / "gc.lock").write_text(f"{os.uname().nodename} {os.getpid()}\n")
    store.remove(store.latest(Identity("ns", "a", "c")))  # type: ignore[arg-type]
    assert store.collect(min_age=0) == (0, 0)
    (tmp_path / "s" / "v1" / "gc.lock").write_text(f"{os.uname().nodename} 999999999\n")  # its owner is gone
    assert store.collect(min_age=0)[0] == 1
    assert not (tmp_path / "s" / "v1" / "gc.lock").exists()


@pytest.mark.parametrize("seed", [1, 2])
def test_collection_under_concurrent_publishes_and_claims_never_loses_a_chunk(tmp_path: Path, seed: int) -> None:
    """Writers publish checkpoints made of a small set of shared blocks (each supersedes its
    identity's previous one, so chunks keep falling out of use and coming back), restorers
    claim, restore and release or remove, and collection runs with no minimum age the whole
    time. Every restore of a claimed checkpoint must succeed and give its bytes back."""
    store = Store(str(tmp_path / "s"))
    rng = random.Random(seed)
    blocks = [os.urandom(BLOCK) for _ in range(12)]
    idents = [Identity("ns", f"p{i}", "c") for i in range(3)]
    stop = threading.Event()
    failures: list[str] = []
    restored = [0]
    collected = [0]

    def writer(n: int) -> None:
        r = random.Random(seed * 100 + n)
        scratch = tmp_path / f"w{n}"
        scratch.mkdir()
        while not stop.is_set():
            payload = b"".join(r.choice(blocks) for _ in range(r.randint(1, 6)))
            try:
                _publish(store, scratch, payload, r.choice(idents))
            except Exception as exc:
                failures.append(f"publish: {exc!r}")

    def restorer(n: int) -> None:
        r = random.Random(seed * 1000 + n)
        while not stop.is_set():
            entry = store.latest(r.choice(idents))
            claimed = store.claim(entry) if entry is not None else None
            if claimed is None or claimed.manifest is None:
                continue
            out = tmp_path / f"out-{n}"
            try:
                store.restore_file(claimed, claimed.manifest.files[0].path, str(out))
                if blake3.blake3(out.read_bytes()).hexdigest() != claimed.manifest.image:
                    failures.append(f"{claimed.id}: restored bytes differ")
                restored[0] += 1
            except archive.IntegrityError as exc:
                failures.append(f"{claimed.id}: {exc}")
            finally:
                out.unlink(missing_ok=True)
            if r.random() < 0.5:
                store.release(claimed, claimed.manifest)
            else:
                store.remove(claimed)

    def collector() -> None:
        while not stop.is_set():
            collected[0] += store.collect(min_age=0)[0]

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    threads += [threading.Thread(target=restorer, args=(i,)) for i in range(2)]
    threads += [threading.Thread(target=collector)]
    for t in threads:
        t.start()
    # At least a few seconds of it, and on a loaded machine until there was enough of it.
    deadline = time.monotonic() + 60
    time.sleep(4 + rng.random())
    while (restored[0] <= 20 or not collected[0]) and not failures and time.monotonic() < deadline:
        time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join()
    assert not failures, failures[:5]
    assert restored[0] > 20 and collected[0] > 0, (restored, collected)
    for entry in store.entries():
        if entry.state in ("checkpoints", "claimed") and entry.manifest is not None:
            assert store.verify(entry) == [], entry.id
    assert not any(p.name.startswith(DOOMED) for p in (tmp_path / "s" / "v1" / "chunks").rglob("*"))
