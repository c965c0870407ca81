"""The store key: sealed chunks and manifests, key rings, rotation, and the node-local policy."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import mmap
import os
from pathlib import Path
from typing import Any

import pytest

from hotrestart.store import keyfile, locality, seal
from hotrestart.store.locality import filesystem_type, require_key
from hotrestart.store.seal import KeyRing, Opener, Sealer, SealError, canonical

ME = os.geteuid()


def key_line(name: str, key: bytes | None = None) -> str:
    return f"{name}:{base64.b64encode(key or os.urandom(32)).decode()}\n"


def write_key(path: Path, text: str | bytes, mode: int = 0o600) -> Path:
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    path.chmod(mode)
    return path


def ring_of(*names: str) -> KeyRing:
    return KeyRing([(n, os.urandom(32)) for n in names])


def sealed_manifest(sealer: Sealer, cid: str, digests: list[str]) -> dict[str, Any]:
    manifest: dict[str, Any] = {"id": cid, "files": [{"path": "images/pages.img.zst", "chunks": digests}]}
    manifest["seal"] = sealer.seal_info()
    manifest["seal"]["mac"] = sealer.sign(canonical(manifest))
    return manifest


# --- sealing and opening ---


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


# --- key files ---


def test_key_file(tmp_path: Path) -> None:
    k1, k2 = os.urandom(32), os.urandom(32)
    text = "# rotated 2025-01\n\n" + key_line("k2025-06", k2) + "  " + key_line("k2025-01", k1)
    ring = keyfile.load(str(write_key(tmp_path / "key", text, 0o400)), owner=ME)
    assert ring.active == "k2025-06" and ring.names == ("k2025-06", "k2025-01")
    assert ring.key("k2025-01") == k1 and ring.key("k2025-06") == k2


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o610])
def test_key_file_open_to_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = write_key(tmp_path / "key", key_line("k1"), mode)
    with pytest.raises(SealError, match=f"mode 0{mode:o} gives group or others access"):
        keyfile.load(str(path), owner=ME)


def test_key_file_of_another_owner_is_refused(tmp_path: Path) -> None:
    path = write_key(tmp_path / "key", key_line("k1"))
    with pytest.raises(SealError, match=f"owned by uid {ME}, must be owned by uid {ME + 1}"):
        keyfile.load(str(path), owner=ME + 1)
    if ME == 0:
        os.chown(path, 1000, 1000)
        with pytest.raises(SealError, match="owned by uid 1000, must be owned by uid 0"):
            keyfile.load(str(path))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (key_line("k1", os.urandom(16)), "key 'k1' is 16 bytes, not 32"),
        (key_line("k1", os.urandom(33)), "key 'k1' is 33 bytes, not 32"),
        ("k1:" + "*" * 44 + "\n", "key 'k1' is not base64"),
        ("k1:" + base64.b64encode(os.urandom(32)).decode()[:-2] + "\n", "key 'k1' is not base64"),
        (key_line("k1") + key_line("k2") + key_line("k1"), "line 3: key 'k1' is listed twice"),
        ("# nothing\n\n", "no keys"),
        ("", "no keys"),
        ("just-base64-without-name\n", "line 1: not <name>:<base64 key>"),
        (key_line("bad name"), "key name 'bad name' is not"),
        (key_line(".hidden"), "key name '.hidden' is not"),
        (key_line("x" * 65), "is not 1-64"),
        ("k1:é\n", "not ASCII"),
    ],
)
def test_bad_key_file_is_refused(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(SealError, match=message):
        keyfile.load(str(write_key(tmp_path / "key", text)), owner=ME)


def test_key_file_errors_do_not_echo_keys(tmp_path: Path) -> None:
    secret = base64.b64encode(os.urandom(31)).decode()
    with pytest.raises(SealError) as caught:
        keyfile.load(str(write_key(tmp_path / "key", f"k1:{secret}\n")), owner=ME)
    assert secret not in str(caught.value)


def test_key_file_size_is_capped(tmp_path: Path) -> None:
    text = key_line("k1") + "#" * keyfile.MAX_KEY_FILE
    with pytest.raises(SealError, match="larger than 65536 bytes"):
        keyfile.load(str(write_key(tmp_path / "key", text)), owner=ME)
    padded = (key_line("k1") + "#" * keyfile.MAX_KEY_FILE)[: keyfile.MAX_KEY_FILE]
    assert keyfile.load(str(write_key(tmp_path / "key", padded)), owner=ME).active == "k1"


def test_key_file_symlink_is_refused(tmp_path: Path) -> None:
    real = write_key(tmp_path / "real", key_line("k1"))
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(SealError, match="is a symbolic link"):
        keyfile.load(str(tmp_path / "link"), owner=ME)


def test_key_file_missing_or_special(tmp_path: Path) -> None:
    with pytest.raises(SealError, match="No such file"):
        keyfile.load(str(tmp_path / "absent"), owner=ME)
    os.mkfifo(tmp_path / "fifo", 0o600)
    with pytest.raises(SealError, match="not a regular file"):  # and does not hang
        keyfile.load(str(tmp_path / "fifo"), owner=ME)


def test_ring_checks() -> None:
    with pytest.raises(SealError, match="empty"):
        KeyRing([])
    with pytest.raises(SealError, match="listed twice"):
        KeyRing([("a", os.urandom(32)), ("a", os.urandom(32))])
    with pytest.raises(SealError, match="31 bytes"):
        KeyRing([("a", os.urandom(31))])
    with pytest.raises(SealError, match="not in the key ring"):
        ring_of("a").key("b")


# --- key directories (Kubernetes Secret volumes) ---


def secret_volume(root: Path, files: dict[str, str], mode: int = 0o400) -> Path:
    """The layout kubelet writes: the files in a timestamped folder, reached through ..data."""
    stamp = root / "..2025_01_01_00_00_00.000000000"
    stamp.mkdir(parents=True)
    for name, text in files.items():
        write_key(stamp / name, text, mode)
        (root / name).symlink_to(f"..data/{name}")
    (root / "..data").symlink_to(stamp.name)
    root.chmod(0o1777)  # as a Secret volume's root is
    return root


def b64key(key: bytes) -> str:
    return base64.b64encode(key).decode() + "\n"


def test_key_directory_single_key(tmp_path: Path) -> None:
    key = os.urandom(32)
    ring = keyfile.load(str(secret_volume(tmp_path / "vol", {"k1": b64key(key)})), owner=ME)
    assert ring.active == "k1" and ring.key("k1") == key


def test_key_directory_active(tmp_path: Path) -> None:
    old, new = os.urandom(32), os.urandom(32)
    vol = secret_volume(tmp_path / "vol", {"a-new": b64key(new), "z-old": b64key(old), "active": "a-new\n"})
    ring = keyfile.load(str(vol), owner=ME)
    assert ring.active == "a-new" and ring.names == ("a-new", "z-old") and ring.key("z-old") == old


def test_key_directory_plain_files(tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    write_key(tmp_path / "k1", b64key(os.urandom(32)))
    write_key(tmp_path / "k2", b64key(os.urandom(32)))
    write_key(tmp_path / "active", "k1")
    assert keyfile.load(str(tmp_path), owner=ME).names == ("k1", "k2")


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"k1": "k", "k2": "k"}, "2 keys and no file 'active'"),
        ({"k1": "k", "active": "k9"}, "'active' names 'k9', which is not one of its keys"),
        ({"active": "k1"}, "no keys"),
        ({"k1": base64.b64encode(os.urandom(24)).decode()}, "key 'k1' is 24 bytes"),
        ({"k1": "not base64!"}, "key 'k1' is not base64"),
        ({"bad name": "k"}, "key name is not"),
    ],
)
def test_bad_key_directory_is_refused(tmp_path: Path, files: dict[str, str], message: str) -> None:
    files = {n: b64key(os.urandom(32)) if t == "k" else t for n, t in files.items()}
    with pytest.raises(SealError, match=message):
        keyfile.load(str(secret_volume(tmp_path / "vol", files)), owner=ME)


def test_key_directory_file_checks(tmp_path: Path) -> None:
    vol = secret_volume(tmp_path / "vol", {"k1": b64key(os.urandom(32))}, mode=0o644)  # defaultMode left alone
    with pytest.raises(SealError, match="k1: mode 0644"):
        keyfile.load(str(vol), owner=ME)
    with pytest.raises(SealError, match="must be owned by uid"):
        keyfile.load(str(vol), owner=ME + 1)


def test_key_directory_links_stay_inside(tmp_path: Path) -> None:
    outside = write_key(tmp_path / "outside", b64key(os.urandom(32)))
    vol = secret_volume(tmp_path / "vol", {"k1": b64key(os.urandom(32)), "active": "k1"})
    (vol / "k2").symlink_to(outside)
    with pytest.raises(SealError, match="k2: leads outside the key directory"):
        keyfile.load(str(vol), owner=ME)


def test_key_directory_itself_not_a_symlink(tmp_path: Path) -> None:
    vol = secret_volume(tmp_path / "vol", {"k1": b64key(os.urandom(32))})
    (tmp_path / "link").symlink_to(vol)
    with pytest.raises(SealError, match="symbolic link"):
        keyfile.load(str(tmp_path / "link"), owner=ME)


# --- node-local stores ---

MOUNTINFO = r"""22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
23 22 0:21 / /proc rw,nosuid shared:2 - proc proc rw
30 22 0:40 / /var/lib/shared rw,relatime shared:10 - nfs4 srv:/export rw,vers=4.2
31 30 8:2 / /var/lib/shared/local rw,relatime shared:11 - xfs /dev/sdb1 rw
32 22 0:41 / /mnt/sshfs rw,nosuid,nodev shared:12 - fuse.sshfs user@host:/ rw,user_id=0
33 22 0:42 / /mnt/with\040space rw - cifs //srv/share rw
34 22 0:43 / /mnt/local\040disk rw - btrfs /dev/sdc1 rw
35 22 0:44 / /mnt/stack rw - nfs srv:/a rw
36 22 0:45 / /mnt/stack rw - tmpfs tmpfs rw
37 22 0:46 / /mnt/nooptional rw - ceph 10.0.0.1:/ rw
38 22 0:47 / /var/lib/sharedX rw master:3 propagate_from:2 unbindable - virtiofs tag rw
"""


@pytest.fixture
def mountinfo(tmp_path: Path) -> str:
    path = tmp_path / "mountinfo"
    path.write_text(MOUNTINFO)
    return str(path)


@pytest.mark.parametrize(
    ("path", "fstype"),
    [
        ("/var/lib/hotrestart/store", "ext4"),
        ("/", "ext4"),
        ("/var/lib/shared", "nfs4"),
        ("/var/lib/shared/store", "nfs4"),
        ("/var/lib/shared/local/store", "xfs"),  # longest prefix wins
        ("/var/lib/shared/localx", "nfs4"),  # on component boundaries only
        ("/var/lib/sharedX/store", "virtiofs"),
        ("/mnt/sshfs/store", "fuse.sshfs"),
        ("/mnt/with space/store", "cifs"),
        ("/mnt/local disk", "btrfs"),
        ("/mnt/stack/store", "tmpfs"),  # of two at one point, the later is on top
        ("/mnt/nooptional/x", "ceph"),
        ("/var/lib/shared/local/../store", "nfs4"),  # resolved first
    ],
)
def test_filesystem_type(mountinfo: str, path: str, fstype: str) -> None:
    assert filesystem_type(path, mountinfo=mountinfo) == fstype


@pytest.mark.parametrize(
    ("path", "local"),
    [
        ("/var/lib/hotrestart/store", True),
        ("/var/lib/shared/local/store", True),
        ("/mnt/local disk/store", True),
        ("/var/lib/shared/store", False),
        ("/mnt/sshfs/store", False),
        ("/mnt/with space/store", False),
        ("/mnt/nooptional", False),
        ("/var/lib/sharedX", False),
        ("s3://bucket/prefix", False),
    ],
)
def test_require_key(mountinfo: str, path: str, local: bool) -> None:
    require_key(path, ring_of("k1"), False, mountinfo=mountinfo)
    require_key(path, None, True, mountinfo=mountinfo)
    if local:
        require_key(path, None, False, mountinfo=mountinfo)
        assert locality.node_local(path, mountinfo=mountinfo)
    else:
        with pytest.raises(SealError, match="needs a store key, or unauthenticated checkpoints allowed"):
            require_key(path, None, False, mountinfo=mountinfo)
        assert not locality.node_local(path, mountinfo=mountinfo)


def test_unreadable_mountinfo_is_not_node_local(tmp_path: Path) -> None:
    with pytest.raises(SealError, match="cannot tell which filesystem"):
        require_key("/var/lib/store", None, False, mountinfo=str(tmp_path / "absent"))
    (tmp_path / "mountinfo").write_text("garbage\n")
    with pytest.raises(SealError, match="no mount"):
        require_key("/var/lib/store", None, False, mountinfo=str(tmp_path / "mountinfo"))


def test_this_machine(tmp_path: Path) -> None:
    assert filesystem_type(str(tmp_path))  # the real /proc/self/mountinfo parses
