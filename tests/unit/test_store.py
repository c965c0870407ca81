"""The checkpoint store: atomic publish and claim, verification, retention, layout rights."""

from __future__ import annotations

import dataclasses
import errno
import os
import time
from pathlib import Path

import pytest

from hotrestart.store import archive
from hotrestart.store.manifest import Identity, Manifest, ManifestError, chunk_root
from hotrestart.store.store import Store

IDENT = Identity("ns", "web-0", "app")


def make_checkpoint(store: Store, tmp: Path, payload: bytes = b"memory" * 1000, created: float | None = None) -> str:
    cid, staging = store.new_staging()
    src = tmp / f"pages-{cid}.img"
    src.write_bytes(payload)
    os.makedirs(os.path.join(staging, "images"))
    entry = archive.compress_file(str(src), os.path.join(staging, "images", "pages.img.zst"), "images/pages.img.zst")
    manifest = Manifest(
        id=cid,
        identity=IDENT,
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
    store = Store(str(tmp_path / "s"))
    make_checkpoint(store, tmp_path)
    os.umask(0o022)
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
    monkeypatch.setattr(archive, "_workers", lambda: cores)  # 2: inline; 4: a pool of 3
    images, dest = tmp_path / "images", tmp_path / "staging"
    dest.mkdir()
    follower = archive.Follower(str(images), str(dest), "images/", chunk=64 << 10)
    follower.start()
    images.mkdir()
    payload = b"".join(os.urandom(1000) + b"\0" * 3096 for _ in range(100)) + b"tail"
    with open(images / "pages-1.img", "wb", buffering=0) as f:
        for at in range(0, len(payload), 50_000):
            f.write(payload[at : at + 50_000])
            time.sleep(archive.Follower.POLL * 2)
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
    follower = archive.Follower(str(tmp_path / "images"), str(tmp_path), "images/", chunk=4096)
    follower.start()
    time.sleep(archive.Follower.POLL * 3)
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
