"""Damaged and corrupt checkpoints: found by verify, kept from restores, harmless to the rest, pruned once proven."""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from storekit import IDENT, make_checkpoint, published_entry

from hotrestart.store import safefs
from hotrestart.store.archive import IntegrityError
from hotrestart.store.entry import Entry, Fault
from hotrestart.store.manifest import Identity
from hotrestart.store.store import Store


def chunk_file(store: Store, digest: str, space: str = "plain") -> Path:
    return Path(store.root, "v1", "chunks", space, digest[:2], digest)


def rewrite_manifest(entry: Entry, change: Callable[[dict[str, Any]], None]) -> None:
    path = Path(entry.path) / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_verify_command_finds_a_damaged_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hotrestart.cli import main

    store = Store(str(tmp_path / "s"))
    cid = make_checkpoint(store, tmp_path, os.urandom(50_000))
    with pytest.raises(SystemExit) as done:
        main(["--store", store.root, "verify", cid[:12]])
    assert done.value.code == 0 and f"{cid}: ok (1 of 1 files intact)" in capsys.readouterr().out
    entry = store.latest(IDENT)
    assert entry is not None and entry.manifest is not None
    [chunk] = entry.manifest.files[0].chunks
    stored = chunk_file(store, chunk.digest)
    data = bytearray(stored.read_bytes())
    data[100] ^= 1
    stored.write_bytes(bytes(data))
    with pytest.raises(SystemExit) as done:
        main(["--store", store.root, "verify", cid])
    out = capsys.readouterr().out
    assert done.value.code == 1 and "DAMAGED (0 of 1 files intact)" in out and "do not match" in out


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


def test_verify_refuses_a_chunk_list_that_does_not_match_the_files_digest(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    make_checkpoint(store, tmp_path)
    entry = published_entry(store)

    def no_chunks(m: dict[str, Any]) -> None:
        # Sizes that add up, its digest kept: an empty file is stored as no chunks, but its
        # digest is that of no chunks, not this one.
        m["files"][0].update(chunks=[], stored_bytes=0, raw_bytes=0)

    rewrite_manifest(entry, no_chunks)
    entry = published_entry(store)
    assert store.verify(entry) == ["images/pages.img.zst: the manifest's chunk list does not match the file's digest"]
    with pytest.raises(IntegrityError, match="digest"):
        store.restore_file(entry, "images/pages.img.zst", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()

    def other_chunk(m: dict[str, Any]) -> None:
        m["files"][0]["chunks"][0]["digest"] = "ab" * 32

    make_checkpoint(store, tmp_path)
    rewrite_manifest(published_entry(store), other_chunk)
    assert "does not match the file's digest" in store.verify(published_entry(store))[0]


def test_a_manifest_of_the_earlier_schema_is_listed_as_corrupt_and_pruned_after_grace(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    old = make_checkpoint(store, tmp_path, os.urandom(50_000), ident=Identity("ns", "old", "c"))
    good = make_checkpoint(store, tmp_path, os.urandom(50_000))
    old_entry = next(e for e in store.entries() if e.id == old)
    assert old_entry.manifest is not None
    [old_chunk] = old_entry.manifest.files[0].chunks
    # What an earlier version wrote (its files were whole in the checkpoint's folder).
    rewrite_manifest(old_entry, lambda m: m.update(schema="hotrestart.io/checkpoint/v1"))
    found = {e.id: e for e in store.entries()}
    assert found[old].fault == Fault.CORRUPT and found[old].manifest is None
    assert "written by an earlier version" in found[old].problem
    assert found[good].fault is None
    assert store.latest(Identity("ns", "old", "c")) is None, "never restored"
    assert store.verify(found[old]) == [found[old].problem]
    assert store.prune() == [], "inside the grace period"
    later = time.time() + 2 * 3600
    assert [e.id for e in store.prune(now=later)] == [old]
    # A v1 manifest refers to no chunk (v1 had none): what it lists does not keep one.
    assert store.collected == (1, old_chunk.stored) and not chunk_file(store, old_chunk.digest).exists()
    assert store.verify(published_entry(store)) == []
