"""The checkpoint store: private layout, publish and claim, release, retention, pending markers, identities, sealing."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from storekit import IDENT, make_checkpoint

from hotrestart.store import archive
from hotrestart.store.entry import Fault, identity_key
from hotrestart.store.manifest import Identity
from hotrestart.store.pending import PENDING_TTL
from hotrestart.store.seal import KeyRing
from hotrestart.store.store import Store


def test_layout_is_private(tmp_path: Path) -> None:
    # The most permissive umask, set before anything is made: every mode the store does not
    # enforce itself (the test's own makedirs of images/ included) comes out open to all.
    previous = os.umask(0)
    try:
        store = Store(str(tmp_path / "s"))
        make_checkpoint(store, tmp_path)
    finally:
        os.umask(previous)
    assert os.listdir(Path(store.root, "v1", "chunks", "plain")), "the chunks' folders are walked too"
    for dirpath, _dirnames, filenames in os.walk(store.root):
        assert os.stat(dirpath).st_mode & 0o777 == 0o700, dirpath
        for name in filenames:
            assert os.stat(os.path.join(dirpath, name)).st_mode & 0o777 == 0o600, name


def test_publish_keeps_newest_and_claim_has_one_winner(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    make_checkpoint(store, tmp_path, created=time.time() - 10)
    newest = make_checkpoint(store, tmp_path)
    entry = store.latest(IDENT)
    assert entry is not None and entry.id == newest
    assert [e.id for e in store.entries() if e.state == "checkpoints"] == [newest]
    first = store.claim(entry)
    second = store.claim(entry)
    assert first is not None and second is None
    assert store.latest(IDENT) is None


def test_unfinished_staging_is_never_listed_as_restorable_and_prune_clears_it(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    _cid, staging = store.new_staging()
    (Path(staging) / "owner").write_text("otherhost 1\n")
    os.utime(staging, (time.time() - 7200, time.time() - 7200))
    assert store.latest(IDENT) is None
    removed = store.prune()
    assert [e.state for e in removed] == ["staging"]


def test_release_and_quarantine(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    make_checkpoint(store, tmp_path)
    entry = store.latest(IDENT)
    assert entry is not None and entry.manifest is not None
    claimed = store.claim(entry)
    assert claimed is not None and claimed.manifest is not None
    claimed.manifest.restore_attempts = 1
    released = store.release(claimed, claimed.manifest)
    again = store.latest(IDENT)
    assert again is not None and again.manifest is not None and again.manifest.restore_attempts == 1
    log = tmp_path / "restore.log"
    log.write_text("criu said no\n")
    q = store.quarantine(store.claim(released) or released, "CRIU refused", str(log))
    assert (Path(q.path) / "reason.txt").read_text().endswith("CRIU refused\n")
    assert (Path(q.path) / "restore.log").read_text() == "criu said no\n"
    assert store.latest(IDENT) is None


def test_prune_by_age_and_size(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    old = make_checkpoint(store, tmp_path, created=time.time() - 3 * 86400)
    store2 = Store(str(tmp_path / "s"))
    removed = store2.prune(max_age=86400)
    assert [e.id for e in removed] == [old]
    make_checkpoint(store, tmp_path, os.urandom(200_000))
    assert store.prune(max_bytes=1000)
    assert store.latest(IDENT) is None


def test_prune_collects_the_chunks_only_removed_checkpoints_used(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    old = make_checkpoint(
        store, tmp_path, os.urandom(150_000), created=time.time() - 3 * 86400, ident=Identity("ns", "a", "c")
    )
    make_checkpoint(store, tmp_path, os.urandom(170_000), ident=Identity("ns", "b", "c"))
    chunk_dir = Path(store.root, "v1", "chunks", "plain")
    before = {p.name: p.stat().st_size for p in chunk_dir.glob("*/*")}
    assert len(before) == 2, "one chunk each (under 4 MiB), not shared"
    for listed in store.entries():
        assert listed.manifest is not None and listed.manifest.stored_bytes > 100_000
        assert store.size(listed) >= listed.manifest.stored_bytes, "an entry's size counts the chunks it uses"
    # Fresh chunks are never collected: a writer may be about to use them.
    assert [e.id for e in store.prune(max_age=86400)] == [old] and store.collected == (0, 0)
    assert len(list(chunk_dir.glob("*/*"))) == 2
    store.prune(max_age=86400, now=time.time() + 3600)
    [left] = [p.name for p in chunk_dir.glob("*/*")]
    assert store.collected == (1, sum(n for name, n in before.items() if name != left))
    entry = store.latest(Identity("ns", "b", "c"))
    assert entry is not None and store.verify(entry) == []


def test_an_older_checkpoint_published_late_is_discarded(tmp_path: Path) -> None:
    # A periodic checkpoint still compressing when the stop checkpoint lands must not win.
    store = Store(str(tmp_path / "s"))
    newest = make_checkpoint(store, tmp_path)
    make_checkpoint(store, tmp_path, created=time.time() - 10)
    assert [e.id for e in store.entries()] == [newest]


def test_pending_marker_of_a_dead_process_is_ignored(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    store.mark_pending(IDENT, "c1")
    assert store.is_pending(IDENT)
    marker = next((tmp_path / "s" / "v1" / "pending").iterdir())
    host = marker.read_text().split()[0]
    marker.write_text(f"{host} 999999 0\n")
    assert not store.is_pending(IDENT)


def test_pending_markers_expire(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    store.mark_pending(IDENT, "c1")
    now = time.time()
    assert store.is_pending(IDENT, now=now)
    assert not store.is_pending(IDENT, now=now + PENDING_TTL + 1), "a crashed node's marker expires"
    assert not list((tmp_path / "s" / "v1" / "pending").iterdir()), "and is cleared"
    store.mark_pending(IDENT, "c2")
    marker = next((tmp_path / "s" / "v1" / "pending").iterdir())
    marker.write_text(f"othernode 1 {now + 3600}\n")
    assert not store.is_pending(IDENT, now=now), "a marker dated in the future is not believed"
    for text in ("othernode 1 nan\n", "othernode 1 inf\n", "garbage\n"):
        store.mark_pending(IDENT, "c3")
        (tmp_path / "s" / "v1" / "pending" / f"{identity_key(IDENT)}.c3").write_text(text)
        assert not store.is_pending(IDENT, now=now)
    store.mark_pending(IDENT, "c4")
    (tmp_path / "s" / "v1" / "pending" / f"{identity_key(IDENT)}.c4").write_text(f"othernode 1 {now - 5}\n")
    assert store.is_pending(IDENT, now=now), "another node's fresh marker is waited for"


def test_identity_is_scoped_to_its_namespace(tmp_path: Path) -> None:
    a, b = Identity("tenant-a", "web-0", "app", key="shared"), Identity("tenant-b", "web-0", "app", key="shared")
    assert a.canonical() == "tenant-a//shared" and identity_key(a) != identity_key(b)
    assert Identity("ns", "web-0", "app").canonical() == "ns/web-0/app"
    forms = [
        Identity("ns", "p", "c"),
        Identity("ns", "", "p/c"),
        Identity("ns", "p/c", ""),
        Identity("ns", "p", "c", key="k"),
        Identity("ns", "", "k"),
        Identity("ns/p", "c", "", key=""),
        Identity("", "ns", "p", key="c"),
        Identity("ns", "x", "y", key="p/c"),
        Identity("ns", "", "", key="/k"),
    ]
    assert len({f.canonical() for f in forms}) == len(forms), "canonical() is injective"
    store = Store(str(tmp_path / "s"))
    make_checkpoint(store, tmp_path, ident=a)
    assert store.latest(a) is not None and store.latest(b) is None
    renamed = Identity("tenant-a", "web-7f9c", "app", key="shared")
    assert store.latest(renamed) is not None, "a key survives a new pod name within its namespace"
    # A manifest of A's identity copied into B's folder is not B's checkpoint either.
    entry = store.latest(a)
    assert entry is not None
    forged = Path(store.root) / "v1" / "checkpoints" / identity_key(b) / entry.id
    shutil.copytree(entry.path, forged)
    assert store.latest(b) is None
    assert {e.fault for e in store.entries()} == {None, Fault.CORRUPT}


def test_sealed_checkpoints_open_only_with_the_key_and_unaltered(tmp_path: Path) -> None:
    ring = KeyRing([("k1", os.urandom(32))])
    keyed = Store(str(tmp_path / "store"), keys=ring)
    payload = os.urandom(200_000) + bytes(300_000)
    make_checkpoint(keyed, tmp_path, payload)
    entry = keyed.latest(IDENT)
    assert entry is not None and entry.manifest is not None and entry.manifest.seal["key"] == "k1"
    assert entry.manifest.space.startswith("k-")
    keyed.restore_file(entry, "images/pages.img.zst", str(tmp_path / "out"))
    assert (tmp_path / "out").read_bytes() == payload
    assert keyed.verify(entry) == []
    # Without the key: listed as unsupported, never restorable.
    [seen] = [e for e in Store(str(tmp_path / "store")).entries() if e.state == "checkpoints"]
    assert seen.manifest is None and seen.fault is not None and seen.fault.value == "unsupported"
    # One flipped stored byte: the chunk does not authenticate.
    [chunk] = entry.manifest.files[0].chunks
    stored = Path(keyed.root, "v1", "chunks", entry.manifest.space) / chunk.digest[:2] / chunk.digest
    data = bytearray(stored.read_bytes())
    data[100] ^= 1
    stored.write_bytes(bytes(data))
    with pytest.raises(archive.IntegrityError, match="authenticate"):
        keyed.restore_file(entry, "images/pages.img.zst", str(tmp_path / "out2"))
    assert not (tmp_path / "out2").exists()
    assert keyed.verify(entry)
    # An unsealed checkpoint in a keyed store is never offered for a restore.
    make_checkpoint(Store(str(tmp_path / "plain")), tmp_path)
    assert Store(str(tmp_path / "plain"), keys=ring).latest(IDENT) is None
    # An altered manifest fails its MAC.
    manifest = Path(entry.path) / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"tcp": "close"', '"tcp": "keep"'))
    [bad] = [e for e in keyed.entries() if e.state == "checkpoints"]
    assert bad.manifest is None and "authenticate" in bad.problem
