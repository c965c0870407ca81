"""Shared builders for the store's tests: an identity, a published checkpoint, a sample manifest, a key ring."""

from __future__ import annotations

import concurrent.futures
import os
import time
from pathlib import Path

from hotrestart.store import chunking
from hotrestart.store.chunkwrite import ChunkWriter
from hotrestart.store.entry import Entry
from hotrestart.store.manifest import Chunk, FileEntry, Identity, Manifest, chunk_root
from hotrestart.store.seal import KeyRing
from hotrestart.store.store import Store

IDENT = Identity("ns", "web-0", "app")


def make_checkpoint(
    store: Store,
    tmp: Path,
    payload: bytes = b"memory" * 1000,
    created: float | None = None,
    ident: Identity = IDENT,
    reason: str = "stop",
) -> str:
    cid, staging = store.new_staging()
    src = tmp / f"pages-{cid}.img"
    src.write_bytes(payload)
    writer = store.chunk_writer(staging)
    try:
        entry = store_file(writer, src, "images/pages.img.zst")
        writer.finish()
    finally:
        writer.close()
    manifest = Manifest(
        id=cid,
        identity=ident,
        created_at=created or time.time(),
        node="n1",
        reason=reason,
        image="img",
        spec_digest="d",
        runtime={"criu": "4.2"},
        network={},
        files=[entry],
        timings={},
        space=writer.space,
        new_bytes=writer.new_bytes,
    )
    store.publish(staging, manifest, store.sealer(cid))
    return cid


def store_file(writer: ChunkWriter, src: Path, rel: str, chunk: int = chunking.CHUNK) -> FileEntry:
    """Store one local file through `writer`, cut at fixed offsets of `chunk` bytes."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return writer.store_file(str(src), rel, chunking.fixed(src.stat().st_size, chunk), pool)


def published_entry(store: Store) -> Entry:
    entry = store.latest(IDENT)
    assert entry is not None and entry.manifest is not None
    return entry


def base_manifest() -> str:
    chunk = Chunk(100, 6000, "ab" * 32)
    files = [FileEntry("images/pages-1.img.zst", chunk_root([chunk]), 100, 6000, [chunk])]
    return Manifest("c-1", IDENT, 1000.0, "n1", "stop", "img", "d", {"criu": "4.2"}, {}, files, {"dump": 1.0}).to_json()


def ring_of(*names: str) -> KeyRing:
    return KeyRing([(n, os.urandom(32)) for n in names])
