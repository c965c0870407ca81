"""Sealed manifests and chunks: manifests bound to their checkpoint, chunks shared per key, key rings and rotation."""

from __future__ import annotations

import concurrent.futures
import hmac
import json
import mmap
import os
import time
from pathlib import Path
from typing import Any

import blake3
import pytest
from storekit import IDENT, make_checkpoint, published_entry, ring_of, store_file

from hotrestart.store import archive, seal
from hotrestart.store.chunkcodec import PLAIN_SPACE, Codec
from hotrestart.store.entry import Fault
from hotrestart.store.manifest import Manifest
from hotrestart.store.seal import ChunkKeys, KeyRing, Opener, Sealer, SealError, canonical
from hotrestart.store.store import Store


def sealed_manifest(sealer: Sealer, cid: str, digests: list[str]) -> dict[str, Any]:
    manifest: dict[str, Any] = {"id": cid, "files": [{"path": "images/pages.img.zst", "chunks": digests}]}
    manifest["seal"] = sealer.seal_info()
    manifest["seal"]["mac"] = sealer.sign(canonical(manifest))
    return manifest


def name(keys: ChunkKeys, raw: bytes) -> bytes:
    """A chunk's name as the codec makes it: the keyed BLAKE3 digest of its bytes."""
    return blake3.blake3(raw, key=keys.name_key).digest()


def sealed(keys: ChunkKeys, raw: bytes) -> tuple[bytes, bytes]:
    """(name, sealed bytes) of the chunk `raw`."""
    digest = name(keys, raw)
    out = bytearray(len(raw) + seal.TAG_BYTES)
    assert keys.seal_into(digest, raw, out) == len(out)
    return digest, bytes(out)


def opened(keys: ChunkKeys, digest: bytes, data: bytes) -> bytes:
    out = bytearray(max(len(data) - seal.TAG_BYTES, 0))
    n = keys.open_into(digest, data, out)
    return bytes(out[:n])


# -- manifests -------------------------------------------------------------------------------------


def test_manifest_round_trip() -> None:
    ring = ring_of("k1")
    sealer = ring.sealer("cp-1")
    manifest = sealed_manifest(sealer, "cp-1", ["aa", "bb"])
    info = manifest["seal"]
    assert info["alg"] == seal.ALG == "aes-256-gcm+blake3+hkdf-sha256"
    assert info["key"] == "k1" and len(bytes.fromhex(info["salt"])) == seal.SALT_BYTES
    assert sealer.seal_info()["mac"] == info["mac"] and len(bytes.fromhex(info["mac"])) == 32

    # What is stored is JSON, read back and parsed.
    stored = json.loads(json.dumps(manifest, indent=2))
    opener = ring.opener(stored["seal"], "cp-1")
    opener.verify(canonical(stored), stored["seal"]["mac"])
    assert opener.key_name == "k1"
    # A rewritten manifest (a restore attempt counted) is signed again under the same key.
    stored["restore_attempts"] = 1
    stored["seal"]["mac"] = opener.sign(canonical(stored))
    ring.opener(stored["seal"], "cp-1").verify(canonical(stored), stored["seal"]["mac"])


def test_each_checkpoint_gets_its_own_manifest_key() -> None:
    ring = ring_of("k1")
    a, b = ring.sealer("cp-1"), ring.sealer("cp-1")
    assert a.seal_info()["salt"] != b.seal_info()["salt"]
    assert a.sign(b"same body") != b.sign(b"same body")
    # ... while the chunks of both are sealed with one set of keys: that is what dedups them.
    assert a.chunks is b.chunks is ring.chunk_keys("k1")


def test_checkpoint_id_is_required() -> None:
    for cid in ("", "a\0b"):
        with pytest.raises(SealError, match="cannot be sealed"):
            ring_of("k1").sealer(cid)


def test_manifest_under_a_wrong_key_fails() -> None:
    sealer = KeyRing([("k1", os.urandom(32))]).sealer("cp-1")
    manifest = sealed_manifest(sealer, "cp-1", [])
    other = KeyRing([("k1", os.urandom(32))])  # same name, different key
    with pytest.raises(SealError, match="does not authenticate with key 'k1'"):
        other.opener(manifest["seal"], "cp-1").verify(canonical(manifest), manifest["seal"]["mac"])


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
        lambda m: m.__setitem__("space", "plain"),
        lambda m: m["seal"].__setitem__("key", "k2"),  # both keys in the ring
        lambda m: m["seal"].__setitem__("salt", "00" * 16),
        lambda m: m["seal"].__setitem__("mac", "00" * 32),
        lambda m: m["seal"].__setitem__("mac", "not hex"),
        lambda m: m["seal"].__setitem__("mac", m["seal"]["mac"][:-2]),
        lambda m: m["seal"].__setitem__("mac", ""),
    ],
)
def test_tampered_manifest_fails(edit: Any) -> None:
    ring = KeyRing([("k1", os.urandom(32)), ("k2", os.urandom(32))])
    manifest = sealed_manifest(ring.sealer("cp-1"), "cp-1", ["aa", "bb"])
    opener = ring.opener(manifest["seal"], "cp-1")
    opener.verify(canonical(manifest), manifest["seal"]["mac"])  # untouched, it authenticates
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
        ({"alg": "aes-256-gcm+hkdf-sha256", "key": "k1", "salt": "00" * 16, "mac": ""}, "sealed with 'aes-256-gcm"),
        ({"key": "k1", "salt": "00" * 16, "mac": ""}, "sealed with None"),
        ({"alg": seal.ALG, "key": "k1", "salt": "00" * 8, "mac": ""}, "salt is 8 bytes"),
        ({"alg": seal.ALG, "key": "k1", "salt": "zz", "mac": ""}, "salt is not hex"),
        ({"alg": seal.ALG, "key": "k1", "mac": ""}, "lacks a key name, salt or MAC"),
    ],
)
def test_bad_seal_is_refused(info: dict[str, str], message: str) -> None:
    with pytest.raises(SealError, match=message):
        Opener(ring_of("k1"), info, "cp-1")


def test_the_mac_key_is_only_for_checkpoints() -> None:
    ring = ring_of("k1")
    with pytest.raises(SealError, match="cannot share the checkpoint keys' label"):
        seal.purpose_key(ring, "k1", b"", b"hotrestart.io/seal/v1 manifest key\0")
    salt = os.urandom(seal.SALT_BYTES)
    a = seal.purpose_key(ring, "k1", salt, b"test purpose")
    assert a == seal.purpose_key(ring, "k1", salt, b"test purpose") != seal.purpose_key(ring, "k1", salt, b"other")


# -- chunks ----------------------------------------------------------------------------------------


def test_chunk_round_trip() -> None:
    keys = ring_of("k1").chunk_keys("k1")
    for raw in (os.urandom(1000), b"\0" * 5000, b"x"):
        digest, data = sealed(keys, raw)
        assert len(data) == len(raw) + seal.TAG_BYTES
        assert len(raw) < 16 or raw not in data  # a byte or two turn up in random bytes by chance
        assert opened(keys, digest, data) == raw
    assert keys.space.startswith("k-") and len(keys.space) == 26 and keys.name == "k1"


def test_chunk_round_trip_into_buffers() -> None:
    keys = ring_of("k1").chunk_keys("k1")
    plain = os.urandom(5000)
    digest = name(keys, plain)
    out = bytearray(8192)
    n = keys.seal_into(digest, memoryview(plain), out)
    assert n == len(plain) + seal.TAG_BYTES
    data = bytes(out[:n])
    with mmap.mmap(-1, 8192) as target:
        with memoryview(target) as view:
            assert keys.open_into(digest, memoryview(data), view[100:]) == len(plain)
        assert target[100 : 100 + len(plain)] == plain
    with pytest.raises(ValueError, match="holds 10 bytes"):
        keys.seal_into(digest, plain, bytearray(10))
    with pytest.raises(ValueError, match="holds 10 bytes"):
        keys.open_into(digest, data, bytearray(10))
    with pytest.raises(SealError, match="32 bytes"):
        keys.seal_into(digest[:31], plain, out)
    with pytest.raises(SealError, match="32 bytes"):
        keys.open_into(digest + b"\0", data, out)


def test_equal_chunks_seal_equal_and_distinct_ones_do_not() -> None:
    keys = ring_of("k1").chunk_keys("k1")
    raw = os.urandom(4096)
    assert sealed(keys, raw) == sealed(keys, bytes(raw))
    other = bytearray(raw)
    other[-1] ^= 1
    (d1, s1), (d2, s2) = sealed(keys, raw), sealed(keys, bytes(other))
    assert d1 != d2 and d1[: seal.NONCE_BYTES] != d2[: seal.NONCE_BYTES] and s1[:-1] != s2[:-1]


def test_chunk_keys_are_the_same_on_every_node_with_the_key() -> None:
    key = os.urandom(32)
    here, there = KeyRing([("k1", key)]), KeyRing([("other", os.urandom(32)), ("k1", key)])
    a, b = here.chunk_keys("k1"), there.chunk_keys("k1")
    assert a is not b
    assert (a.name_key, a.space) == (b.name_key, b.space)
    raw = os.urandom(3000)
    assert sealed(a, raw) == sealed(b, raw)  # what one node wrote, another finds and reuses
    digest, data = sealed(a, raw)
    assert opened(b, digest, data) == raw
    # Derived from the key alone: a node that names the same key otherwise shares its chunks.
    renamed = KeyRing([("renamed", key)]).chunk_keys("renamed")
    assert renamed.space == a.space and sealed(renamed, raw) == sealed(a, raw)
    # One ring hands out one object per key name.
    assert here.chunk_keys("k1") is a


def test_chunk_keys_differ_between_keys() -> None:
    ring = KeyRing([("k1", os.urandom(32)), ("k2", os.urandom(32))])
    same_name = KeyRing([("k1", os.urandom(32))]).chunk_keys("k1")
    a, b = ring.chunk_keys("k1"), ring.chunk_keys("k2")
    raw = os.urandom(3000)
    for other in (b, same_name):
        assert other.space != a.space and other.name_key != a.name_key
        assert name(other, raw) != name(a, raw)
        assert sealed(other, raw)[1] != sealed(a, raw)[1]
    with pytest.raises(SealError, match="not in the key ring"):
        ring.chunk_keys("k3")


def test_chunk_key_derivation_is_pinned() -> None:
    """Chunk names and ciphertexts are shared by every node and every version that holds
    the key: their derivation is a stored format, recomputed here from its definition."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    def hkdf(key: bytes, info: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"", info=info).derive(key)

    key = bytes(range(32))
    keys = KeyRing([("k1", key)]).chunk_keys("k1")
    name_key = hkdf(key, b"hotrestart.io/seal/v2 chunk name key\0")
    assert keys.name_key == name_key
    assert keys.space == "k-" + hmac.digest(name_key, b"space", "sha256").hex()[:24]
    raw = b"a chunk of memory" * 100
    digest = blake3.blake3(raw, key=name_key).digest()
    aead = AESGCM(hkdf(key, b"hotrestart.io/seal/v2 chunk key\0"))
    expected = aead.encrypt(digest[:12], raw, b"hotrestart.io/seal/v2 chunk\0" + digest)
    assert sealed(keys, raw) == (digest, expected)
    assert Codec(keys).digest(raw) == digest.hex()


def test_chunk_under_a_wrong_key_fails() -> None:
    keys = ring_of("k1").chunk_keys("k1")
    digest, data = sealed(keys, b"secret" * 100)
    other = KeyRing([("k1", os.urandom(32))]).chunk_keys("k1")  # same name, different key
    with pytest.raises(SealError, match=f"chunk {digest.hex()[:16]} does not authenticate"):
        opened(other, digest, data)


def test_chunk_under_another_name_fails() -> None:
    keys = ring_of("k1").chunk_keys("k1")
    first, second = sealed(keys, b"first" * 100), sealed(keys, b"second" * 100)
    with pytest.raises(SealError, match="does not authenticate"):
        opened(keys, first[0], second[1])
    with pytest.raises(SealError, match="does not authenticate"):
        opened(keys, second[0], first[1])
    # The nonce is the name's first 12 bytes, but the whole name is authenticated.
    same_nonce = first[0][: seal.NONCE_BYTES] + bytes(32 - seal.NONCE_BYTES)
    with pytest.raises(SealError, match="does not authenticate"):
        opened(keys, same_nonce, first[1])
    assert opened(keys, first[0], first[1]) == b"first" * 100


@pytest.mark.parametrize("change", ["flip", "truncate", "extend", "tag", "short", "empty"])
def test_tampered_chunk_fails(change: str) -> None:
    keys = ring_of("k1").chunk_keys("k1")
    digest, data = sealed(keys, os.urandom(4096))
    tampered = bytearray(data)
    if change == "flip":
        tampered[100] ^= 1
    elif change == "truncate":
        del tampered[-1]
    elif change == "extend":
        tampered += b"\0"
    elif change == "tag":
        tampered[-1] ^= 0x80
    elif change == "short":
        tampered = tampered[: seal.TAG_BYTES - 1]
    else:
        tampered = bytearray()
    with pytest.raises(SealError, match=f"chunk {digest.hex()[:16]} does not authenticate"):
        opened(keys, digest, bytes(tampered))


def test_keyed_codec_refuses_what_does_not_open() -> None:
    keys = ring_of("k1").chunk_keys("k1")
    codec = Codec(keys)
    raw = os.urandom(20000)
    digest = codec.digest(raw)
    assert digest != Codec().digest(raw) == blake3.blake3(raw).hexdigest()  # names tell nothing without the key
    stored = codec.encode(digest, raw)
    assert raw[:64] not in stored and codec.space == keys.space != PLAIN_SPACE
    out = bytearray(len(raw))
    codec.decode_into(digest, stored, memoryview(out))
    assert out == raw
    flipped = bytearray(stored)
    flipped[len(flipped) // 2] ^= 4
    other = Codec(ring_of("k1").chunk_keys("k1"))
    for bad_codec, bad in ((codec, bytes(flipped)), (codec, stored[:-1]), (other, stored), (Codec(), stored)):
        with pytest.raises(archive.IntegrityError):
            bad_codec.decode_into(digest, bad, memoryview(bytearray(len(raw))))


def test_concurrent_seal_and_open() -> None:
    keys = ring_of("k1").chunk_keys("k1")
    data = [os.urandom(64 << 10) for _ in range(64)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        done = list(pool.map(lambda raw: sealed(keys, raw), data))
        assert list(pool.map(lambda d: opened(keys, *d), done)) == data


# -- key rings and rotation ------------------------------------------------------------------------


def test_rotation() -> None:
    old, new = os.urandom(32), os.urandom(32)
    before = KeyRing([("old", old)])
    old_sealer = before.sealer("cp-old")
    old_chunk = sealed(old_sealer.chunks, b"sealed before")
    old_manifest = sealed_manifest(old_sealer, "cp-old", [old_chunk[0].hex()])

    during = KeyRing([("new", new), ("old", old)])
    assert during.active == "new" and during.names == ("new", "old")
    opener = during.opener(old_manifest["seal"], "cp-old")
    opener.verify(canonical(old_manifest), old_manifest["seal"]["mac"])
    assert opener.chunks.space == before.chunk_keys("old").space
    assert opened(opener.chunks, *old_chunk) == b"sealed before"

    new_sealer = during.sealer("cp-new")
    assert new_sealer.seal_info()["key"] == "new" and new_sealer.chunks.space != opener.chunks.space
    new_manifest = sealed_manifest(new_sealer, "cp-new", [])
    KeyRing([("new", new)]).opener(new_manifest["seal"], "cp-new").verify(
        canonical(new_manifest), new_manifest["seal"]["mac"]
    )
    with pytest.raises(SealError, match="'new', which is not in the key ring"):
        before.opener(new_manifest["seal"], "cp-new")


def test_repr_hides_keys() -> None:
    key = os.urandom(32)
    ring = KeyRing([("k1", key)])
    keys = ring.chunk_keys("k1")
    for text in (repr(ring), repr(keys), repr(ring.sealer("c")), repr(Codec(keys))):
        for secret in (key, keys.name_key):
            assert secret.hex() not in text and str(secret) not in text
    assert "k1" in repr(ring)


def test_ring_checks() -> None:
    with pytest.raises(SealError, match="empty"):
        KeyRing([])
    with pytest.raises(SealError, match="listed twice"):
        KeyRing([("a", os.urandom(32)), ("a", os.urandom(32))])
    with pytest.raises(SealError, match="31 bytes"):
        KeyRing([("a", os.urandom(31))])
    with pytest.raises(SealError, match="not 1-64 of"):
        KeyRing([(".a", os.urandom(32))])
    with pytest.raises(SealError, match="more than 64"):
        KeyRing([(f"k{i}", os.urandom(32)) for i in range(65)])
    with pytest.raises(SealError, match="not in the key ring"):
        ring_of("a").key("b")


# -- a sealed store ----------------------------------------------------------------------------------


def files_under(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):  # links are not followed
        found += [Path(dirpath) / n for n in dirnames + filenames]
    return found


def leaks(root: Path, needles: list[bytes]) -> set[int]:
    """Which of `needles` turn up under `root`, in a file's bytes or (as hex) in a name."""
    found = set()
    for p in files_under(root):
        found |= {i for i, n in enumerate(needles) if n.hex() in p.name}
        if p.is_file() and not p.is_symlink():
            data = p.read_bytes()
            found |= {i for i, n in enumerate(needles) if n in data}
    return found


def test_a_sealed_store_holds_no_plaintext(tmp_path: Path) -> None:
    # Random bytes do not compress: zstd keeps them as they are, so only the seal hides them.
    payload = os.urandom((5 << 20) + 4321)
    needles = [payload[i : i + 32] for i in (0, 1 << 20, (4 << 20) - 48, 5 << 20, len(payload) - 32)]
    needles += [blake3.blake3(payload[: 4 << 20]).digest(), blake3.blake3(payload[4 << 20 :]).digest()]

    sealed_root, plain_root = tmp_path / "sealed", tmp_path / "plain"
    sealed_store, plain_store = Store(str(sealed_root), keys=ring_of("a")), Store(str(plain_root))
    work = tmp_path / "work"
    work.mkdir()
    make_checkpoint(sealed_store, work, payload)
    make_checkpoint(plain_store, work, payload)
    assert len(published_entry(sealed_store).manifest.files[0].chunks) == 2  # type: ignore[union-attr]

    # The search finds the payload where it is kept in the clear...
    assert leaks(plain_root, needles) == set(range(len(needles)))
    # ... and nothing of it in the sealed store: not its bytes, nor its unkeyed digests.
    assert leaks(sealed_root, needles) == set()
    assert any("/v1/chunks/k-" in str(p) for p in files_under(sealed_root))
    assert not (sealed_root / "v1" / "chunks" / PLAIN_SPACE).exists()

    entry = published_entry(sealed_store)
    sealed_store.restore_file(entry, "images/pages.img.zst", str(tmp_path / "out"))
    assert (tmp_path / "out").read_bytes() == payload and sealed_store.verify(entry) == []


def test_sealed_chunks_dedup_across_nodes_and_not_across_keys(tmp_path: Path) -> None:
    key = os.urandom(32)
    root = str(tmp_path / "s")
    payload = os.urandom(3 << 20)
    node1 = Store(root, keys=KeyRing([("a", key)]))
    node2 = Store(root, keys=KeyRing([("a", key)]))
    stranger = Store(root, keys=KeyRing([("a", os.urandom(32))]))
    sizes = []
    for store in (node1, node2, stranger):
        cid, staging = store.new_staging()
        src = tmp_path / f"src-{cid}"
        src.write_bytes(payload)
        writer = store.chunk_writer(staging)
        try:
            store_file(writer, src, "images/pages.img.zst", chunk=1 << 20)
            writer.finish()
        finally:
            writer.close()
        sizes.append((writer.space, writer.new_bytes, writer.shared_bytes))
        store.discard(staging)
    (space1, new1, shared1), (space2, new2, shared2), (space3, new3, _) = sizes
    assert space1 == space2 != space3
    assert new1 > len(payload) and shared1 == 0  # random bytes: three sealed chunks, each a bit larger
    assert new2 == 0 and shared2 == new1  # the other node found every chunk already there
    assert new3 == new1  # another key finds none of them


def rewrite_signed(store: Store, entry_path: str, cid: str, edit: Any) -> None:
    """Edit a published manifest and sign it again with `store`'s key, as a node holding
    the key could: only what the MAC cannot catch is left to be refused."""
    path = Path(entry_path) / "manifest.json"
    manifest = Manifest.from_json(path.read_bytes())
    edit(manifest)
    sealer = store.sealer(cid)
    assert sealer is not None
    manifest.seal = sealer.seal_info()
    manifest.seal["mac"] = ""
    manifest.seal["mac"] = sealer.sign(canonical(json.loads(manifest.to_json())))
    path.write_text(manifest.to_json())


def test_a_manifest_naming_another_keys_chunks_is_refused(tmp_path: Path) -> None:
    ka, kb = os.urandom(32), os.urandom(32)
    root = str(tmp_path / "s")
    store_a = Store(root, keys=KeyRing([("a", ka), ("b", kb)]))
    store_b = Store(root, keys=KeyRing([("b", kb)]))
    work = tmp_path / "work"
    work.mkdir()
    payload = os.urandom(100_000)
    make_checkpoint(store_b, work, payload)
    entry = published_entry(store_a)
    assert entry.manifest is not None and entry.manifest.seal["key"] == "b"
    space_b = entry.manifest.space
    assert space_b == store_b.keys.chunk_keys("b").space  # type: ignore[union-attr]
    # Under its own key, with both keys in the ring, it restores.
    store_a.restore_file(entry, "images/pages.img.zst", str(tmp_path / "good"))
    assert (tmp_path / "good").read_bytes() == payload

    # Signed with key a, it names key b's chunks (which exist and open under b): refused.
    rewrite_signed(store_a, entry.path, entry.id, lambda m: None)
    entry = published_entry(store_a)
    assert entry.manifest is not None and entry.manifest.seal["key"] == "a" and entry.manifest.space == space_b
    with pytest.raises(archive.IntegrityError, match="not where its key keeps them"):
        store_a.restore_file(entry, "images/pages.img.zst", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    assert any("not where its key keeps them" in p for p in store_a.verify(entry))

    # Nor does a manifest sealed with a key send its reader to plaintext chunks.
    rewrite_signed(store_a, entry.path, entry.id, lambda m: setattr(m, "space", PLAIN_SPACE))
    entry = published_entry(store_a)
    with pytest.raises(archive.IntegrityError, match="not where its key keeps them"):
        store_a.restore_file(entry, "images/pages.img.zst", str(tmp_path / "out"))

    # Key a's space, naming key b's chunks: not there, and copied there they do not open.
    space_a = store_a.keys.chunk_keys("a").space  # type: ignore[union-attr]
    rewrite_signed(store_a, entry.path, entry.id, lambda m: setattr(m, "space", space_a))
    entry = published_entry(store_a)
    with pytest.raises(archive.IntegrityError, match="missing from the store"):
        store_a.restore_file(entry, "images/pages.img.zst", str(tmp_path / "out"))
    chunks = tmp_path / "s" / "v1" / "chunks"
    os.rename(chunks / space_b, chunks / space_a)
    with pytest.raises(archive.IntegrityError, match="does not authenticate"):
        store_a.restore_file(entry, "images/pages.img.zst", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_store_with_a_key_restores_only_what_it_can_authenticate(tmp_path: Path) -> None:
    root = str(tmp_path / "s")
    work = tmp_path / "work"
    work.mkdir()
    make_checkpoint(Store(root), work, b"plain" * 1000, created=time.time() - 10)
    keyed = Store(root, keys=ring_of("a"))
    [plain] = keyed.published(IDENT)
    assert plain.fault is Fault.CORRUPT and "not sealed" in plain.problem and keyed.latest(IDENT) is None
    make_checkpoint(keyed, work, b"sealed" * 1000)
    assert published_entry(keyed).manifest.seal  # type: ignore[union-attr]
    sealed_id = published_entry(keyed).id
    # Without the key, a sealed checkpoint is unsupported, not corrupt: never restored,
    # and left alone by retention.
    plain_only = Store(root)
    assert {e.id: e.fault for e in plain_only.published(IDENT)} == {plain.id: None, sealed_id: Fault.UNSUPPORTED}
    assert plain_only.latest(IDENT).id == plain.id  # type: ignore[union-attr]
    other_key = Store(root, keys=ring_of("b"))
    assert {e.id: e.fault for e in other_key.published(IDENT)} == {
        plain.id: Fault.CORRUPT,
        sealed_id: Fault.UNSUPPORTED,
    }
    assert other_key.latest(IDENT) is None
