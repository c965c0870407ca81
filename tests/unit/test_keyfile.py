"""Store key files and key directories (Kubernetes Secret volumes): format, rights, links, rotation order."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from hotrestart.store import keyfile
from hotrestart.store.seal import SealError

ME = os.geteuid()


def key_line(name: str, key: bytes | None = None) -> str:
    return f"{name}:{base64.b64encode(key or os.urandom(32)).decode()}\n"


def write_key(path: Path, text: str | bytes, mode: int = 0o600) -> Path:
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    path.chmod(mode)
    return path


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
