"""The checkpoint store: atomic publish and claim, verification, retention, layout rights."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import json
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zstandard

from hotrestart.store import archive, compress, follow, safefs
from hotrestart.store.entry import Entry, Fault, identity_key
from hotrestart.store.manifest import (
    MAX_CHUNK_RAW,
    MAX_MANIFEST,
    SCHEMA,
    Chunk,
    FileEntry,
    Identity,
    Manifest,
    ManifestError,
    UnsupportedManifestError,
    chunk_root,
)
from hotrestart.store.pending import PENDING_TTL
from hotrestart.store.safefs import UnsafeEntryError
from hotrestart.store.seal import KeyRing
from hotrestart.store.store import Store

IDENT = Identity("ns", "web-0", "app")


def make_checkpoint(
    store: Store,
    tmp: Path,
    payload: bytes = b"memory" * 1000,
    created: float | None = None,
    ident: Identity = IDENT,
) -> str:
    cid, staging = store.new_staging()
    src = tmp / f"pages-{cid}.img"
    src.write_bytes(payload)
    os.makedirs(os.path.join(staging, "images"))
    entry = archive.compress_file(str(src), os.path.join(staging, "images", "pages.img.zst"), "images/pages.img.zst")
    manifest = Manifest(
        id=cid,
        identity=ident,
        created_at=created or time.time(),
        node="n1",
        reason="stop",
        image="img",
        spec_digest="d",
        runtime={"criu": "4.2"},
        network={},
        files=[entry],
        timings={},
    )
    store.publish(staging, manifest)
    return cid


def test_layout_is_private(tmp_path: Path) -> None:
    # The most permissive umask, set before anything is made: every mode the store does not
    # enforce itself (the test's own makedirs of images/ included) comes out open to all.
    previous = os.umask(0)
    try:
        store = Store(str(tmp_path / "s"))
        make_checkpoint(store, tmp_path)
    finally:
        os.umask(previous)
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


def test_roundtrip_and_any_flipped_byte_is_refused(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    payload = os.urandom(100_000) + b"\0" * 100_000
    make_checkpoint(store, tmp_path, payload)
    entry = store.latest(IDENT)
    assert entry is not None and entry.manifest is not None
    fe = entry.manifest.files[0]
    stored = os.path.join(entry.path, fe.path)
    archive.decompress_file(stored, str(tmp_path / "out"), fe)
    assert (tmp_path / "out").read_bytes() == payload
    data = bytearray(Path(stored).read_bytes())
    data[len(data) // 3] ^= 0x40
    Path(stored).write_bytes(bytes(data))
    with pytest.raises(archive.IntegrityError):
        archive.decompress_file(stored, str(tmp_path / "out2"), fe)
    assert not (tmp_path / "out2").exists(), "nothing of a bad file is left for a restore to use"


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    make_checkpoint(store, tmp_path, os.urandom(50_000))
    entry = store.latest(IDENT)
    assert entry is not None and entry.manifest is not None
    fe = entry.manifest.files[0]
    stored = os.path.join(entry.path, fe.path)
    Path(stored).write_bytes(Path(stored).read_bytes()[:-100])
    with pytest.raises(archive.IntegrityError):
        archive.decompress_file(stored, str(tmp_path / "out"), fe)


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


@pytest.mark.parametrize("text", ["", "{}", '{"schema": "other"}', '{"schema": "hotrestart.io/checkpoint/v1"}'])
def test_bad_manifests_are_refused(text: str) -> None:
    with pytest.raises(ManifestError):
        Manifest.from_json(text)


def test_manifest_cannot_name_files_outside_the_checkpoint(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    make_checkpoint(store, tmp_path)
    entry = store.latest(IDENT)
    assert entry is not None and entry.manifest is not None
    text = entry.manifest.to_json().replace('"images/pages.img.zst"', '"../../etc/shadow"')
    with pytest.raises(ManifestError):
        Manifest.from_json(text)


def test_many_chunks_roundtrip_in_parallel(tmp_path: Path) -> None:
    payload = b"".join(os.urandom(2048) + b"\0" * 2048 for _ in range(100)) + b"tail"
    src = tmp_path / "raw"
    src.write_bytes(payload)
    entry = archive.compress_file(str(src), str(tmp_path / "z"), "z", chunk=10_000)
    assert len(entry.chunks) == -(-len(payload) // 10_000)
    assert entry.stored_bytes < len(payload) * 0.6
    archive.decompress_file(str(tmp_path / "z"), str(tmp_path / "out"), entry)
    assert (tmp_path / "out").read_bytes() == payload
    archive.verify_file(str(tmp_path / "z"), entry)


@pytest.mark.parametrize("direct", [True, False])
def test_direct_and_buffered_writes_store_the_same_bytes(tmp_path: Path, direct: bool) -> None:
    # Larger than the direct-I/O staging buffer, and not a whole number of blocks.
    payload = b"".join(os.urandom(3000) + b"\0" * 1096 for _ in range(2600)) + b"odd tail"
    src = tmp_path / "raw"
    src.write_bytes(payload)
    entry = archive.compress_file(str(src), str(tmp_path / "z"), "z", chunk=1 << 20, direct=direct)
    stored = (tmp_path / "z").read_bytes()
    assert len(stored) == entry.stored_bytes, "the padding of the last direct block is cut off"
    assert oct((tmp_path / "z").stat().st_mode & 0o777) == "0o600"
    archive.verify_file(str(tmp_path / "z"), entry)
    archive.decompress_file(str(tmp_path / "z"), str(tmp_path / "out"), entry)
    assert (tmp_path / "out").read_bytes() == payload


def test_a_chunk_list_that_does_not_match_the_file_digest_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "raw"
    src.write_bytes(os.urandom(30_000))
    entry = archive.compress_file(str(src), str(tmp_path / "z"), "z", chunk=10_000)
    assert entry.sha256 == chunk_root(entry.chunks)
    swapped = dataclasses.replace(entry, chunks=[entry.chunks[1], entry.chunks[0], *entry.chunks[2:]])
    with pytest.raises(archive.IntegrityError, match="digest"):
        archive.decompress_file(str(tmp_path / "z"), str(tmp_path / "out"), swapped)
    lying = dataclasses.replace(entry, raw_bytes=entry.raw_bytes + 1)
    with pytest.raises(archive.IntegrityError, match="sizes"):
        archive.decompress_file(str(tmp_path / "z"), str(tmp_path / "out"), lying)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cores", [2, 4])
def test_follower_compresses_a_file_while_it_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cores: int
) -> None:
    monkeypatch.setattr(compress, "workers", lambda: cores)  # 2: inline; 4: a pool of 3
    images, dest = tmp_path / "images", tmp_path / "staging"
    dest.mkdir()
    follower = follow.Follower(str(images), str(dest), "images/", chunk=64 << 10)
    follower.start()
    images.mkdir()
    payload = b"".join(os.urandom(1000) + b"\0" * 3096 for _ in range(100)) + b"tail"
    with open(images / "pages-1.img", "wb", buffering=0) as f:
        for at in range(0, len(payload), 50_000):
            f.write(payload[at : at + 50_000])
            time.sleep(follow.Follower.POLL * 2)
        deadline = time.monotonic() + 5
        while follower._files["pages-1.img"].offset < len(payload) // (64 << 10) * (64 << 10):
            assert time.monotonic() < deadline, "whole chunks are compressed while the file grows"
            time.sleep(0.01)
    (images / "core-1.img").write_bytes(b"not followed")
    entries = follower.finish()
    assert list(entries) == [str(images / "pages-1.img")]
    entry = entries[str(images / "pages-1.img")]
    assert entry.path == "images/pages-1.img.zst" and entry.raw_bytes == len(payload)
    archive.decompress_file(str(dest / "pages-1.img.zst"), str(tmp_path / "out"), entry)
    assert (tmp_path / "out").read_bytes() == payload


def test_follower_close_stops_it_without_a_result(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "pages-1.img").write_bytes(os.urandom(10_000))
    follower = follow.Follower(str(tmp_path / "images"), str(tmp_path), "images/", chunk=4096)
    follower.start()
    time.sleep(follow.Follower.POLL * 3)
    follower.close()
    follower.close()
    assert not follower._thread.is_alive()


@pytest.mark.parametrize("direct", [True, False])
def test_a_full_disk_fails_the_file_with_its_own_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    src = tmp_path / "raw"
    src.write_bytes(os.urandom(3 << 20))
    real_write, written = os.write, [0]

    def write(fd: int, data: bytes) -> int:
        if written[0] + len(data) > 1 << 20:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = real_write(fd, data)
        written[0] += n
        return n

    monkeypatch.setattr(os, "write", write)
    # Not a BufferError from tearing down the staging buffer: the caller logs this one.
    with pytest.raises(OSError) as failure:
        archive.compress_file(str(src), str(tmp_path / "z"), "z", chunk=256 << 10, direct=direct)
    assert failure.value.errno == errno.ENOSPC


def test_verify_command_finds_a_damaged_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hotrestart.cli import main

    store = Store(str(tmp_path / "s"))
    cid = make_checkpoint(store, tmp_path, os.urandom(50_000))
    with pytest.raises(SystemExit) as done:
        main(["--store", store.root, "verify", cid[:12]])
    assert done.value.code == 0 and f"{cid}: ok (1 of 1 files intact)" in capsys.readouterr().out
    entry = store.latest(IDENT)
    assert entry is not None and entry.manifest is not None
    stored = Path(entry.path) / entry.manifest.files[0].path
    data = bytearray(stored.read_bytes())
    data[100] ^= 1
    stored.write_bytes(bytes(data))
    with pytest.raises(SystemExit) as done:
        main(["--store", store.root, "verify", cid])
    out = capsys.readouterr().out
    assert done.value.code == 1 and "DAMAGED (0 of 1 files intact)" in out and "do not match" in out


# -- the store as hostile input ---------------------------------------------------------------


def sentinel(tmp: Path) -> tuple[Path, dict[str, tuple[bytes, int, float]]]:
    """A folder outside the store, and what it must still be after anything the store does."""
    out = tmp / "outside"
    out.mkdir(exist_ok=True)
    os.chmod(out, 0o755)
    (out / "precious").write_bytes(b"keep me")
    os.chmod(out / "precious", 0o644)
    return out, snapshot(out)


def snapshot(out: Path) -> dict[str, tuple[bytes, int, float]]:
    found = {".": (b"", os.lstat(out).st_mode, os.lstat(out).st_mtime)}
    for p in out.rglob("*"):
        st = os.lstat(p)
        found[str(p.relative_to(out))] = (p.read_bytes() if p.is_file() else b"", st.st_mode, st.st_mtime)
    return found


def published_entry(store: Store) -> Entry:
    entry = store.latest(IDENT)
    assert entry is not None and entry.manifest is not None
    return entry


def rewrite_manifest(entry: Entry, change: Callable[[dict[str, Any]], None]) -> None:
    path = Path(entry.path) / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def exercise(store: Store, tmp: Path) -> None:
    """Everything that reads or changes the store; errors are allowed, escapes are not."""
    from hotrestart.cli import main

    for step in (
        lambda: store.ensure(),
        lambda: store.mark_pending(IDENT, "c1"),
        lambda: store.is_pending(IDENT),
        lambda: store.clear_pending(IDENT, "c1"),
        lambda: make_checkpoint(store, tmp),
        lambda: [store.size(e) for e in store.entries()],
        lambda: store.latest(IDENT) and store.claim(store.latest(IDENT)),  # type: ignore[arg-type]
        lambda: store.prune(grace=0, max_age=1, now=time.time() + 86400 * 2),
        lambda: list(map(store.remove, store.entries())),
        lambda: main(["--store", store.root, "ls", "-a"]),
    ):
        with contextlib.suppress(OSError, SystemExit):
            step()


LINK_POSITIONS = [
    "v1",
    "v1/pending",
    "v1/staging",
    "v1/checkpoints",
    "v1/claimed",
    "v1/quarantine",
    "v1/checkpoints/{key}",
    "v1/checkpoints/{key}/{cid}",
    "v1/checkpoints/{key}/{cid}/images",
    "v1/claimed/{cid}",
    "v1/quarantine/{cid}",
]


@pytest.mark.parametrize("position", LINK_POSITIONS)
def test_a_link_anywhere_in_the_store_is_never_followed(tmp_path: Path, position: str) -> None:
    store = Store(str(tmp_path / "s"))
    cid = make_checkpoint(store, tmp_path)
    out, before = sentinel(tmp_path)
    (out / "sub").mkdir()
    (out / "sub" / "file").write_bytes(b"x")
    before = snapshot(out)
    where = tmp_path / "s" / position.format(key=identity_key(IDENT), cid=cid)
    if where.is_dir():
        shutil.rmtree(where)
    where.parent.mkdir(parents=True, exist_ok=True)
    where.symlink_to(out)
    exercise(store, tmp_path)
    assert snapshot(out) == before, "nothing outside the store was written, chmodded or removed"


def test_prune_removes_a_planted_link_itself_not_what_it_points_at(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    store.ensure()
    out, before = sentinel(tmp_path)
    (tmp_path / "s" / "v1" / "claimed" / "c-1").symlink_to(out)
    os.utime(tmp_path / "s" / "v1" / "claimed" / "c-1", (1, 1), follow_symlinks=False)
    [bad] = list(store.entries())
    assert bad.fault is Fault.UNSAFE and "symbolic link" in bad.problem
    assert [e.id for e in store.prune()] == ["c-1"]
    assert not os.path.lexists(tmp_path / "s" / "v1" / "claimed" / "c-1") and snapshot(out) == before


def test_a_hard_link_in_a_checkpoint_being_published_is_refused(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    out, before = sentinel(tmp_path)
    cid, staging = store.new_staging()
    os.link(out / "precious", Path(staging) / "planted")
    manifest = Manifest(cid, IDENT, time.time(), "n1", "stop", "img", "d", {}, {}, [], {})
    with pytest.raises(UnsafeEntryError, match="hard links"):
        store.publish(staging, manifest)
    assert snapshot(out) == before and os.stat(out / "precious").st_mode & 0o777 == 0o644


def test_a_fifo_in_a_checkpoint_never_blocks(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    make_checkpoint(store, tmp_path)
    entry = published_entry(store)
    assert entry.manifest is not None
    fe = entry.manifest.files[0]
    os.unlink(Path(entry.path) / fe.path)
    os.mkfifo(Path(entry.path) / fe.path)
    signal.setitimer(signal.ITIMER_REAL, 5)
    try:
        assert any("FIFO" in p for p in store.verify(entry))
        with pytest.raises(archive.IntegrityError):
            store.restore_file(entry, fe.path, str(tmp_path / "out"))
        with pytest.raises(archive.IntegrityError, match="not a regular file"):
            archive.decompress_file(os.path.join(entry.path, fe.path), str(tmp_path / "out"), fe)
        os.unlink(Path(entry.path) / "manifest.json")
        os.mkfifo(Path(entry.path) / "manifest.json")
        [bad] = list(store.entries())
        assert bad.fault is Fault.CORRUPT and "FIFO" in bad.problem
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def bomb_entry(tmp: Path, raw: int, declared: int) -> FileEntry:
    frame = zstandard.ZstdCompressor(level=3).compress(b"\0" * raw)
    (tmp / "bomb.zst").write_bytes(frame)
    chunk = Chunk(stored=len(frame), raw=declared, sha256=hashlib.sha256(frame).hexdigest())
    return FileEntry("bomb.zst", chunk_root([chunk]), len(frame), declared, [chunk])


def test_a_decompression_bomb_never_writes_more_than_declared(tmp_path: Path) -> None:
    fe = bomb_entry(tmp_path, 32 << 20, 4096)  # 32 MiB of zeros in a few KiB, declared as 4 KiB
    assert fe.stored_bytes < 8192
    with pytest.raises(archive.IntegrityError, match="more than 4096"):
        archive.decompress_file(str(tmp_path / "bomb.zst"), str(tmp_path / "out"), fe)
    assert not (tmp_path / "out").exists()
    with pytest.raises(archive.IntegrityError, match="more than"):
        archive.verify_file(str(tmp_path / "bomb.zst"), fe)


def test_raw_sizes_are_capped_before_anything_is_written(tmp_path: Path) -> None:
    fe = bomb_entry(tmp_path, 1 << 20, 1 << 20)
    with pytest.raises(archive.IntegrityError, match="allowed"):
        archive.decompress_file(str(tmp_path / "bomb.zst"), str(tmp_path / "out"), fe, cap=(1 << 20) - 1)
    assert not (tmp_path / "out").exists()
    archive.decompress_file(str(tmp_path / "bomb.zst"), str(tmp_path / "out"), fe, cap=1 << 20)
    big = dataclasses.replace(fe, chunks=[dataclasses.replace(fe.chunks[0], raw=MAX_CHUNK_RAW + 1)])
    big.raw_bytes = MAX_CHUNK_RAW + 1
    with pytest.raises(archive.IntegrityError, match="larger than"):
        archive.decompress_file(str(tmp_path / "bomb.zst"), str(tmp_path / "out2"), big)
    text = json.dumps(
        {"schema": SCHEMA, **{k: v for k, v in json.loads(base_manifest()).items() if k != "schema"}}
    ).replace('"raw": 6000', f'"raw": {MAX_CHUNK_RAW + 1}')
    with pytest.raises(ManifestError):
        Manifest.from_json(text)


def base_manifest() -> str:
    chunk = Chunk(100, 6000, "ab" * 32)
    files = [FileEntry("images/pages-1.img.zst", chunk_root([chunk]), 100, 6000, [chunk])]
    return Manifest("c-1", IDENT, 1000.0, "n1", "stop", "img", "d", {"criu": "4.2"}, {}, files, {"dump": 1.0}).to_json()


MALFORMED: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
    ("files not objects", lambda m: m.update(files=[1])),
    ("string chunk size", lambda m: m["files"][0]["chunks"][0].update(stored="100")),
    ("bool count", lambda m: m.update(restore_attempts=True)),
    ("negative size", lambda m: m["files"][0].update(raw_bytes=-1)),
    ("huge size", lambda m: m["files"][0].update(raw_bytes=10**40)),
    ("bad sha256", lambda m: m["files"][0]["chunks"][0].update(sha256="zz" * 32)),
    ("upper-case sha256", lambda m: m["files"][0].update(sha256="AB" * 32)),
    ("absolute path", lambda m: m["files"][0].update(path="/etc/shadow")),
    ("dot-dot path", lambda m: m["files"][0].update(path="images/../../x")),
    ("empty path part", lambda m: m["files"][0].update(path="images//x")),
    ("duplicate file", lambda m: m["files"].append(m["files"][0])),
    ("missing field", lambda m: m.pop("node")),
    ("identity not an object", lambda m: m.update(identity="ns/web-0/app")),
    ("id not safe", lambda m: m.update(id="../c-1")),
    ("string too long", lambda m: m.update(image="x" * 5000)),
    ("control characters", lambda m: m.update(node="n1\x1b[2J")),
    ("runtime not strings", lambda m: m.update(runtime={"criu": 4})),
    ("timing negative", lambda m: m.update(timings={"dump": -1})),
    ("tcp unknown", lambda m: m.update(tcp="maybe")),
    ("created_at a string", lambda m: m.update(created_at="yesterday")),
    ("created_at far ahead", lambda m: m.update(created_at=time.time() + 3 * 86400)),
    ("addresses not a list", lambda m: m.update(network={"addresses": "10.0.0.1"})),
    ("gpu process not an object", lambda m: m.update(gpu={"processes": [1]})),
    ("gpu memory a string", lambda m: m.update(gpu={"processes": [{"memory_used": "1"}]})),
    ("sizes do not add up", lambda m: m["files"][0].update(stored_bytes=99)),
    ("garbage schema", lambda m: m.update(schema="something/else")),
]


@pytest.mark.parametrize("name", [name for name, _ in MALFORMED])
def test_malformed_manifests_are_refused_with_a_reason(name: str) -> None:
    data = json.loads(base_manifest())
    dict(MALFORMED)[name](data)
    with pytest.raises(ManifestError) as refused:
        Manifest.from_json(json.dumps(data))
    assert not isinstance(refused.value, UnsupportedManifestError) and str(refused.value)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers_are_refused(literal: str) -> None:
    with pytest.raises(ManifestError):
        Manifest.from_json(base_manifest().replace('"created_at": 1000.0', f'"created_at": {literal}'))


def test_oversized_and_deeply_nested_manifests_are_refused() -> None:
    with pytest.raises(ManifestError, match="larger"):
        Manifest.from_json(" " * (MAX_MANIFEST + 1))
    with pytest.raises(ManifestError):
        Manifest.from_json("[" * 100_000 + "]" * 100_000)
    deep = base_manifest().replace('"network": {}', '"network": ' + '{"a": ' * 20 + "1" + "}" * 20)
    with pytest.raises(ManifestError, match="deeply"):
        Manifest.from_json(deep)


def test_newer_schemas_and_fields_are_unsupported_not_corrupt() -> None:
    with pytest.raises(UnsupportedManifestError):
        Manifest.from_json(base_manifest().replace(SCHEMA, "hotrestart.io/checkpoint/v2"))
    data = json.loads(base_manifest())
    data["parent"] = {"id": "x"}
    with pytest.raises(UnsupportedManifestError, match="parent"):
        Manifest.from_json(json.dumps(data))
    assert Manifest.from_json(base_manifest()).files[0].chunks[0].raw == 6000


def test_one_bad_entry_breaks_nothing_else(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hotrestart.cli import main

    store = Store(str(tmp_path / "s"))
    other = Identity("ns", "db-0", "db")
    good = make_checkpoint(store, tmp_path)
    bad = make_checkpoint(store, tmp_path, ident=other)
    bad_entry = store.latest(other)
    assert bad_entry is not None
    rewrite_manifest(bad_entry, lambda m: m.update(files=[1]))
    states = {e.id: e.fault for e in store.entries()}
    assert states == {good: None, bad: Fault.CORRUPT}
    for argv in (["ls"], ["inspect", good], ["verify", good], ["prune"]):
        with pytest.raises(SystemExit) as done:
            main(["--store", store.root, *argv])
        assert done.value.code == 0, argv
    out = capsys.readouterr().out
    assert f"{bad} (checkpoint, corrupt): files[0] is not an object" in out
    assert store.latest(other) is None
    with pytest.raises(SystemExit) as done:
        main(["--store", store.root, "verify", bad])
    assert done.value.code == 1
    with pytest.raises(SystemExit) as done:
        main(["--store", store.root, "rm", bad])
    assert done.value.code == 0 and [e.id for e in store.entries()] == [good]
    assert store.latest(IDENT) is not None


def test_infinity_or_a_far_future_time_cannot_pin_an_identity(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    make_checkpoint(store, tmp_path)
    entry = published_entry(store)
    path = Path(entry.path) / "manifest.json"
    path.write_text(path.read_text().replace(f'"created_at": {entry.manifest.created_at!r}', '"created_at": Infinity'))  # type: ignore[union-attr]
    assert store.latest(IDENT) is None
    newer = make_checkpoint(store, tmp_path)
    assert published_entry(store).id == newer, "the new checkpoint was published, not discarded"
    rewrite_manifest(published_entry(store), lambda m: m.update(created_at=time.time() + 2 * 86400))
    newest = make_checkpoint(store, tmp_path)
    assert published_entry(store).id == newest


def test_prune_removes_only_proven_corruption_after_a_grace_period(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(str(tmp_path / "s"))
    corrupt = make_checkpoint(store, tmp_path, ident=Identity("ns", "a", "c"))
    newer = make_checkpoint(store, tmp_path, ident=Identity("ns", "b", "c"))
    flaky = make_checkpoint(store, tmp_path, ident=Identity("ns", "d", "c"))
    found = {e.id: e for e in store.entries()}
    rewrite_manifest(found[corrupt], lambda m: m.update(files="x"))
    rewrite_manifest(found[newer], lambda m: m.update(schema="hotrestart.io/checkpoint/v7"))
    assert store.prune() == [], "nothing is removed inside the grace period"
    real_read = safefs.read_file

    def read(fd: int, name: str, limit: int) -> bytes:
        if name == "manifest.json" and flaky in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE))
        return real_read(fd, name, limit)

    monkeypatch.setattr(safefs, "read_file", read)
    faults = {e.id: e.fault for e in store.entries()}
    assert faults == {corrupt: Fault.CORRUPT, newer: Fault.UNSUPPORTED, flaky: Fault.UNREADABLE}
    later = time.time() + 2 * 3600
    assert [e.id for e in store.prune(now=later, max_age=60, max_bytes=0)] == [corrupt]
    monkeypatch.undo()
    assert {e.id for e in store.entries()} == {newer, flaky}


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


def test_verify_refuses_a_file_with_no_chunks(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    make_checkpoint(store, tmp_path)
    entry = published_entry(store)
    empty = hashlib.sha256(b"").hexdigest()

    def no_chunks(m: dict[str, Any]) -> None:
        m["files"][0].update(chunks=[], stored_bytes=0, raw_bytes=0, sha256=empty)

    rewrite_manifest(entry, no_chunks)
    open(Path(entry.path) / "images" / "pages.img.zst", "w").close()
    entry = published_entry(store)
    assert store.verify(entry) == ["images/pages.img.zst: the manifest lists no chunks"]


def _sealed_checkpoint(store: Store, tmp: Path, payload: bytes) -> str:
    cid, staging = store.new_staging()
    sealer = store.sealer(cid)
    assert sealer is not None
    src = tmp / f"pages-{cid}.img"
    src.write_bytes(payload)
    os.makedirs(os.path.join(staging, "images"))
    seal = functools.partial(sealer.seal_chunk, 0)
    entry = archive.compress_file(
        str(src), os.path.join(staging, "images", "pages.img.zst"), "images/pages.img.zst", chunk=1 << 16, seal=seal
    )
    manifest = Manifest(
        id=cid,
        identity=IDENT,
        created_at=time.time(),
        node="n1",
        reason="stop",
        image="img",
        spec_digest="d",
        runtime={"criu": "4.2"},
        network={},
        files=[entry],
        timings={},
    )
    store.publish(staging, manifest, sealer)
    return cid


def test_sealed_checkpoints_open_only_with_the_key_and_unaltered(tmp_path: Path) -> None:
    ring = KeyRing([("k1", os.urandom(32))])
    keyed = Store(str(tmp_path / "store"), keys=ring)
    payload = os.urandom(200_000) + bytes(300_000)
    _sealed_checkpoint(keyed, tmp_path, payload)
    entry = keyed.latest(IDENT)
    assert entry is not None and entry.manifest is not None and entry.manifest.seal["key"] == "k1"
    keyed.restore_file(entry, "images/pages.img.zst", str(tmp_path / "out"))
    assert (tmp_path / "out").read_bytes() == payload
    assert keyed.verify(entry) == []
    # Without the key: listed as unsupported, never restorable.
    [seen] = [e for e in Store(str(tmp_path / "store")).entries() if e.state == "checkpoints"]
    assert seen.manifest is None and seen.fault is not None and seen.fault.value == "unsupported"
    # One flipped stored byte: the chunk does not authenticate.
    stored = Path(entry.path) / "images" / "pages.img.zst"
    data = bytearray(stored.read_bytes())
    data[100] ^= 1
    stored.write_bytes(bytes(data))
    with pytest.raises(archive.IntegrityError, match="authenticate"):
        keyed.restore_file(entry, "images/pages.img.zst", str(tmp_path / "out2"))
    assert keyed.verify(entry)
    # An unsealed checkpoint in a keyed store is never offered for a restore.
    make_checkpoint(Store(str(tmp_path / "plain")), tmp_path)
    assert Store(str(tmp_path / "plain"), keys=ring).latest(IDENT) is None
    # An altered manifest fails its MAC.
    manifest = Path(entry.path) / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"tcp": "close"', '"tcp": "keep"'))
    [bad] = [e for e in keyed.entries() if e.state == "checkpoints"]
    assert bad.manifest is None and "authenticate" in bad.problem
