"""Sealed chunks and manifests: authentication, binding to position and checkpoint, key rings and rotation."""

from __future__ import annotations

import concurrent.futures
import json
import mmap
import os
from typing import Any

import pytest
from storekit import ring_of

from hotrestart.store import seal
from hotrestart.store.seal import KeyRing, Opener, Sealer, SealError, canonical


def sealed_manifest(sealer: Sealer, cid: str, digests: list[str]) -> dict[str, Any]:
    manifest: dict[str, Any] = {"id": cid, "files": [{"path": "images/pages.img.zst", "chunks": digests}]}
    manifest["seal"] = sealer.seal_info()
    manifest["seal"]["mac"] = sealer.sign(canonical(manifest))
    return manifest


def test_round_trip() -> None:
    ring = ring_of("k1")
    sealer = ring.sealer("cp-1")
    chunks = [os.urandom(1000), b"", b"\0" * 5000]
    sealed = [sealer.seal_chunk(0, i, c) for i, c in enumerate(chunks)]
    sealed.append(sealer.seal_chunk(1, 0, memoryview(b"other file")))
    assert all(len(s) == len(c) + 16 for s, c in zip(sealed, chunks, strict=False))
    assert sealed[0][:1000] != chunks[0]
    manifest = sealed_manifest(sealer, "cp-1", ["aa", "bb"])
    info = manifest["seal"]
    assert info["alg"] == seal.ALG and info["key"] == "k1" and len(bytes.fromhex(info["salt"])) == 16
    assert sealer.seal_info()["mac"] == info["mac"]

    # What is stored is JSON, read back and parsed.
    stored = json.loads(json.dumps(manifest, indent=2))
    opener = ring.opener(stored["seal"], "cp-1")
    opener.verify(canonical(stored), stored["seal"]["mac"])
    assert [opener.open_chunk(0, i, s) for i, s in enumerate(sealed[:3])] == chunks
    assert opener.open_chunk(1, 0, memoryview(sealed[3])) == b"other file"


def test_round_trip_into_buffers() -> None:
    ring = ring_of("k1")
    sealer = ring.sealer("cp-1")
    plain = os.urandom(5000)
    out = bytearray(8192)
    n = sealer.seal_chunk_into(0, 0, memoryview(plain), out)
    assert n == len(plain) + seal.TAG_BYTES
    sealed = bytes(out[:n])
    opener = ring.opener(sealer.seal_info(), "cp-1")
    assert opener.open_chunk(0, 0, sealed) == plain
    with mmap.mmap(-1, 8192) as target:
        with memoryview(target) as view:
            assert opener.open_chunk_into(0, 0, sealed, view[100:]) == len(plain)
        assert target[100 : 100 + len(plain)] == plain
    with pytest.raises(ValueError, match="holds 10 bytes"):
        sealer.seal_chunk_into(0, 1, plain, bytearray(10))
    with pytest.raises(ValueError, match="holds 10 bytes"):
        opener.open_chunk_into(0, 0, sealed, bytearray(10))
    with pytest.raises(SealError, match="sealed twice"):  # one claim per position, either way
        sealer.seal_chunk(0, 0, plain)
    tampered = bytearray(sealed)
    tampered[0] ^= 1
    with pytest.raises(SealError, match="does not authenticate"):
        opener.open_chunk_into(0, 0, tampered, out)
    with pytest.raises(SealError, match="does not authenticate"):
        opener.open_chunk_into(0, 0, sealed[:15], out)
    with pytest.raises(SealError, match="does not authenticate"):
        opener.open_chunk_into(0, 1, sealed, out)


def test_each_checkpoint_gets_its_own_salt() -> None:
    ring = ring_of("k1")
    a, b = ring.sealer("cp-1"), ring.sealer("cp-1")
    assert a.seal_info()["salt"] != b.seal_info()["salt"]
    assert a.seal_chunk(0, 0, b"same") != b.seal_chunk(0, 0, b"same")


def test_concurrent_seal_and_open() -> None:
    ring = ring_of("k1")
    sealer = ring.sealer("cp-1")
    data = [os.urandom(64 << 10) for _ in range(64)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        sealed = list(pool.map(lambda i: sealer.seal_chunk(0, i, data[i]), range(64)))
        opener = ring.opener(sealer.seal_info(), "cp-1")
        assert list(pool.map(lambda i: opener.open_chunk(0, i, sealed[i]), range(64))) == data


def test_checkpoint_id_is_required() -> None:
    for cid in ("", "a\0b"):
        with pytest.raises(SealError, match="cannot be sealed"):
            ring_of("k1").sealer(cid)


def test_a_position_is_sealed_once() -> None:
    sealer = ring_of("k1").sealer("cp-1")
    sealer.seal_chunk(2, 7, b"x")
    with pytest.raises(SealError, match="sealed twice"):
        sealer.seal_chunk(2, 7, b"y")
    with pytest.raises(SealError, match="out of range"):
        sealer.seal_chunk(-1, 0, b"x")
    with pytest.raises(SealError, match="out of range"):
        sealer.seal_chunk(1 << 32, 0, b"x")


def test_wrong_key_fails() -> None:
    sealer = KeyRing([("k1", os.urandom(32))]).sealer("cp-1")
    sealed = sealer.seal_chunk(0, 0, b"secret")
    manifest = sealed_manifest(sealer, "cp-1", [])
    other = KeyRing([("k1", os.urandom(32))])  # same name, different key
    opener = other.opener(manifest["seal"], "cp-1")
    with pytest.raises(SealError, match="does not authenticate"):
        opener.verify(canonical(manifest), manifest["seal"]["mac"])
    with pytest.raises(SealError, match="does not authenticate"):
        opener.open_chunk(0, 0, sealed)


@pytest.mark.parametrize("change", ["flip", "truncate", "extend", "tag", "empty"])
def test_tampered_chunk_fails(change: str) -> None:
    ring = ring_of("k1")
    sealer = ring.sealer("cp-1")
    sealed = bytearray(sealer.seal_chunk(0, 0, os.urandom(4096)))
    if change == "flip":
        sealed[100] ^= 1
    elif change == "truncate":
        del sealed[-1]
    elif change == "extend":
        sealed += b"\0"
    elif change == "tag":
        sealed[-1] ^= 0x80
    else:
        sealed = bytearray()
    with pytest.raises(SealError, match="chunk 0 of file 0 does not authenticate"):
        ring.opener(sealer.seal_info(), "cp-1").open_chunk(0, 0, bytes(sealed))


def test_swapped_chunks_fail() -> None:
    ring = ring_of("k1")
    sealer = ring.sealer("cp-1")
    first, second = sealer.seal_chunk(0, 0, b"first"), sealer.seal_chunk(0, 1, b"second")
    other_file = sealer.seal_chunk(1, 0, b"other file")
    opener = ring.opener(sealer.seal_info(), "cp-1")
    with pytest.raises(SealError):
        opener.open_chunk(0, 0, second)
    with pytest.raises(SealError):
        opener.open_chunk(0, 1, first)
    with pytest.raises(SealError):
        opener.open_chunk(0, 0, other_file)


def test_chunks_do_not_move_between_checkpoints() -> None:
    ring = ring_of("k1")
    a = ring.sealer("cp-a")
    sealed = a.seal_chunk(0, 0, b"from a")
    b = ring.sealer("cp-b")
    b.seal_chunk(0, 0, b"from b")
    with pytest.raises(SealError):  # b's salt
        ring.opener(b.seal_info(), "cp-b").open_chunk(0, 0, sealed)
    with pytest.raises(SealError):  # a's salt, but found under another id
        ring.opener(a.seal_info(), "cp-b").open_chunk(0, 0, sealed)


def test_manifest_does_not_move_between_checkpoints() -> None:
    ring = ring_of("k1")
    manifest = sealed_manifest(ring.sealer("cp-a"), "cp-a", ["aa"])
    opener = ring.opener(manifest["seal"], "cp-b")  # its folder says cp-b
    with pytest.raises(SealError, match="cp-b: the manifest does not authenticate"):
        opener.verify(canonical(manifest), manifest["seal"]["mac"])


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["files"][0]["chunks"].__setitem__(0, "cc"),
        lambda m: m["files"][0]["chunks"].append("dd"),
        lambda m: m.__setitem__("id", "cp-2"),
        lambda m: m.__setitem__("extra", 1),
        lambda m: m["seal"].__setitem__("key", "k2"),  # both keys in the ring
        lambda m: m["seal"].__setitem__("mac", "00" * 32),
        lambda m: m["seal"].__setitem__("mac", "not hex"),
        lambda m: m["seal"].__setitem__("mac", m["seal"]["mac"][:-2]),
    ],
)
def test_tampered_manifest_fails(edit: Any) -> None:
    ring = KeyRing([("k1", os.urandom(32)), ("k2", os.urandom(32))])
    manifest = sealed_manifest(ring.sealer("cp-1"), "cp-1", ["aa", "bb"])
    edit(manifest)
    opener = ring.opener(manifest["seal"], "cp-1")
    with pytest.raises(SealError, match="does not authenticate"):
        opener.verify(canonical(manifest), manifest["seal"]["mac"])


def test_the_mac_is_not_part_of_what_it_covers() -> None:
    manifest: dict[str, Any] = {"id": "x", "seal": {"alg": seal.ALG, "mac": "a"}}
    assert canonical(manifest) == canonical({**manifest, "seal": {"alg": seal.ALG, "mac": "b"}})
    assert b"mac" not in canonical(manifest)
    assert manifest["seal"]["mac"] == "a"  # not changed in place


@pytest.mark.parametrize(
    ("info", "message"),
    [
        ({"alg": seal.ALG, "key": "gone", "salt": "00" * 16, "mac": ""}, "'gone', which is not in the key ring"),
        ({"alg": "none", "key": "k1", "salt": "00" * 16, "mac": ""}, "sealed with 'none'"),
        ({"key": "k1", "salt": "00" * 16, "mac": ""}, "sealed with None"),
        ({"alg": seal.ALG, "key": "k1", "salt": "00" * 8, "mac": ""}, "salt is 8 bytes"),
        ({"alg": seal.ALG, "key": "k1", "salt": "zz", "mac": ""}, "salt is not hex"),
        ({"alg": seal.ALG, "key": "k1", "mac": ""}, "lacks a key name, salt or MAC"),
    ],
)
def test_bad_seal_is_refused(info: dict[str, str], message: str) -> None:
    with pytest.raises(SealError, match=message):
        Opener(ring_of("k1"), info, "cp-1")


def test_rotation() -> None:
    old, new = os.urandom(32), os.urandom(32)
    before = KeyRing([("old", old)])
    old_sealer = before.sealer("cp-old")
    old_chunk = old_sealer.seal_chunk(0, 0, b"sealed before")
    old_manifest = sealed_manifest(old_sealer, "cp-old", [])

    during = KeyRing([("new", new), ("old", old)])
    assert during.active == "new" and during.names == ("new", "old")
    opener = during.opener(old_manifest["seal"], "cp-old")
    opener.verify(canonical(old_manifest), old_manifest["seal"]["mac"])
    assert opener.open_chunk(0, 0, old_chunk) == b"sealed before"

    new_sealer = during.sealer("cp-new")
    assert new_sealer.seal_info()["key"] == "new"
    new_manifest = sealed_manifest(new_sealer, "cp-new", [])
    KeyRing([("new", new)]).opener(new_manifest["seal"], "cp-new").verify(
        canonical(new_manifest), new_manifest["seal"]["mac"]
    )
    with pytest.raises(SealError, match="'new', which is not in the key ring"):
        before.opener(new_manifest["seal"], "cp-new")


def test_repr_hides_keys() -> None:
    key = os.urandom(32)
    text = repr(KeyRing([("k1", key)]))
    assert "k1" in text and key.hex() not in text and str(key) not in text


def test_ring_checks() -> None:
    with pytest.raises(SealError, match="empty"):
        KeyRing([])
    with pytest.raises(SealError, match="listed twice"):
        KeyRing([("a", os.urandom(32)), ("a", os.urandom(32))])
    with pytest.raises(SealError, match="31 bytes"):
        KeyRing([("a", os.urandom(31))])
    with pytest.raises(SealError, match="not in the key ring"):
        ring_of("a").key("b")
