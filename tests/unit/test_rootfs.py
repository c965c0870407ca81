"""Capture and replay of a container's files: descriptors only, no links followed, no names."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import threading
from pathlib import Path

import pytest

from hotrestart.checkpoint import rootfs
from hotrestart.errors import FilesError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="owners and overlay xattrs need root")


def _capture(source: Path, dest: Path, *, overlay: bool = False) -> rootfs.Changes:
    with open(dest, "wb") as f:
        return rootfs.capture(str(source), f, overlay=overlay)


def _tree(root: Path) -> None:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "app.conf").write_text("x = 1\n")
    os.chown(root / "etc" / "app.conf", 1234, 5678)
    os.chmod(root / "etc" / "app.conf", 0o4750)
    (root / "etc" / "link").symlink_to("/etc/shadow")
    os.mkfifo(root / "fifo", 0o640)
    (root / "deep" / "er").mkdir(parents=True)
    (root / "deep" / "er" / "data").write_bytes(os.urandom(3 << 20))


def test_round_trip_keeps_content_owners_modes_and_links(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    _tree(src)
    dst.mkdir()
    changes = _capture(src, tmp_path / "t.tar")
    rootfs.apply(str(dst), str(tmp_path / "t.tar"), changes)
    conf = os.lstat(dst / "etc" / "app.conf")
    assert (conf.st_uid, conf.st_gid, stat.S_IMODE(conf.st_mode)) == (1234, 5678, 0o4750)
    assert (dst / "etc" / "app.conf").read_text() == "x = 1\n"
    assert os.readlink(dst / "etc" / "link") == "/etc/shadow"  # stored as a link, never read
    assert stat.S_ISFIFO(os.lstat(dst / "fifo").st_mode) and stat.S_IMODE(os.lstat(dst / "fifo").st_mode) == 0o640
    assert (dst / "deep" / "er" / "data").read_bytes() == (src / "deep" / "er" / "data").read_bytes()


def test_owner_names_are_never_looked_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import grp
    import pwd

    def refuse(*_: object) -> None:
        raise AssertionError("a name lookup would run the container's NSS configuration")

    for mod, names in ((pwd, ("getpwnam", "getpwuid")), (grp, ("getgrnam", "getgrgid"))):
        for name in names:
            monkeypatch.setattr(mod, name, refuse)
    src, dst = tmp_path / "src", tmp_path / "dst"
    _tree(src)
    (src / "etc" / "nsswitch.conf").write_text("passwd: evil\ngroup: evil\n")
    dst.mkdir()
    changes = _capture(src, tmp_path / "t.tar")
    rootfs.apply(str(dst), str(tmp_path / "t.tar"), changes)
    with tarfile.open(tmp_path / "t.tar") as tar:
        assert all(m.uname == "" and m.gname == "" for m in tar.getmembers())


def test_devices_and_sockets_are_not_carried(tmp_path: Path) -> None:
    import socket

    src = tmp_path / "src"
    src.mkdir()
    os.mknod(src / "sda", 0o600 | stat.S_IFBLK, os.makedev(8, 0))
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(src / "sock"))
    changes = _capture(src, tmp_path / "t.tar")
    with tarfile.open(tmp_path / "t.tar") as tar:
        assert tar.getnames() == []
    assert len(changes.skipped) == 2


def test_whiteouts_and_opaque_directories(tmp_path: Path) -> None:
    upper, target = tmp_path / "upper", tmp_path / "target"
    upper.mkdir()
    os.mknod(upper / "gone", 0o600 | stat.S_IFCHR, 0)
    (upper / "fresh").mkdir()
    os.setxattr(upper / "fresh", "trusted.overlay.opaque", b"y")
    (upper / "fresh" / "kept").write_text("new")
    target.mkdir()
    (target / "gone").write_text("old")
    (target / "fresh").mkdir()
    (target / "fresh" / "stale").write_text("old")
    changes = _capture(upper, tmp_path / "t.tar", overlay=True)
    assert changes.whiteouts == ["gone"] and changes.opaque == ["fresh"]
    changes = rootfs.Changes.from_json(changes.to_json())
    rootfs.apply(str(target), str(tmp_path / "t.tar"), changes)
    assert sorted(os.listdir(target)) == ["fresh"]
    assert os.listdir(target / "fresh") == ["kept"]


def _hostile_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data else None)


def _reg(name: str, data: bytes = b"pwned") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, b""


@pytest.mark.parametrize(
    "members",
    [
        [_reg("../escape")],
        [_reg("/abs")],
        [_reg("a/../../escape")],
        [_link("out", "OUTSIDE"), _reg("out/escape")],  # through a link the archive made
        [_link("hard", "/etc/passwd", tarfile.LNKTYPE)],
    ],
    ids=["dotdot", "absolute", "nested-dotdot", "through-symlink", "hard-link"],
)
def test_hostile_archives_write_nothing_outside(tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "target"
    target.mkdir()
    members = [(_link(i.name, str(outside))[0], d) if i.linkname == "OUTSIDE" else (i, d) for i, d in members]
    _hostile_tar(tmp_path / "t.tar", members)
    with pytest.raises(FilesError):
        rootfs.apply(str(target), str(tmp_path / "t.tar"))
    assert os.listdir(outside) == []
    assert not (tmp_path / "escape").exists()


def test_an_existing_link_in_the_target_is_replaced_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("host")
    target = tmp_path / "target"
    target.mkdir()
    (target / "secret").symlink_to(outside / "secret")
    _hostile_tar(tmp_path / "t.tar", [_reg("secret", b"container")])
    rootfs.apply(str(target), str(tmp_path / "t.tar"))
    assert (outside / "secret").read_text() == "host"
    assert not (target / "secret").is_symlink() and (target / "secret").read_text() == "container"


def test_whiteouts_through_a_link_delete_nothing_outside(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("host")
    target = tmp_path / "target"
    target.mkdir()
    (target / "d").symlink_to(outside)
    _hostile_tar(tmp_path / "t.tar", [])
    rootfs.apply(str(target), str(tmp_path / "t.tar"), rootfs.Changes(whiteouts=["d/keep"], opaque=["d"]))
    assert (outside / "keep").read_text() == "host"


def test_capture_never_follows_a_directory_swapped_for_a_link(tmp_path: Path) -> None:
    """The container swaps a directory for a link to a host folder while it is walked."""
    host = tmp_path / "host"
    host.mkdir()
    (host / "shadow").write_text("HOST-SECRET")
    src = tmp_path / "src"
    src.mkdir()
    for i in range(50):
        (src / f"f{i}").write_text("c")
    stop = threading.Event()

    def swap() -> None:
        while not stop.is_set():
            d = src / "d"
            try:
                d.mkdir()
                (d / "shadow").write_text("container")
                os.rename(d, src / "d.old")
                (src / "d").symlink_to(host)
                os.unlink(src / "d")
                os.rename(src / "d.old", d)
                (d / "shadow").unlink()
                d.rmdir()
            except OSError:
                pass

    thread = threading.Thread(target=swap)
    thread.start()
    try:
        for n in range(300):
            _capture(src, tmp_path / f"t{n % 2}.tar")
            with tarfile.open(tmp_path / f"t{n % 2}.tar") as tar:
                for m in tar.getmembers():
                    if m.isreg():
                        f = tar.extractfile(m)
                        assert f is not None
                        assert b"HOST-SECRET" not in f.read(), m.name
    finally:
        stop.set()
        thread.join()


def test_malformed_change_lists_are_refused() -> None:
    for text in (b"[]", b"{", b'{"whiteouts": [1]}', b'{"opaque": "x"}'):
        with pytest.raises(FilesError):
            rootfs.Changes.from_json(text)
