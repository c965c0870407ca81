"""Images given at create (a CRI checkpoint archive): attested by this shim, admitted only as
the node allows, and copied after every check."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from hotrestart.checkpoint.attested import ATTESTATION, ArchivePolicy, admit, attest
from hotrestart.errors import ArchiveRestoreError
from hotrestart.store.seal import KeyRing

RING = KeyRing([("k1", b"\1" * 32)])
OTHER = KeyRing([("k1", b"\2" * 32)])
SPEC: dict[str, Any] = {"process": {"user": {"uid": 1000}, "capabilities": {"bounding": ["CAP_CHOWN"]}}}
ATTESTED = ArchivePolicy(allow=True, keys=lambda: RING)


def images(tmp_path: Path, ring: KeyRing | None = RING, spec: dict[str, Any] = SPEC) -> Path:
    src = tmp_path / "checkpoint"
    src.mkdir()
    (src / "inventory.img").write_bytes(b"inventory")
    (src / "pages-1.img").write_bytes(os.urandom(3 << 20))
    (src / "descriptors.json").write_text("[]")
    if ring is not None:
        attest(str(src), ring, spec, "c1", os.listdir(src))
    return src


def test_an_attested_archive_is_copied_whole_and_nothing_else(tmp_path: Path) -> None:
    src = images(tmp_path)
    admitted = admit(str(src), str(tmp_path / "copy"), ATTESTED, SPEC)
    dest = admitted.path
    assert admitted.authenticated
    assert sorted(os.listdir(dest)) == ["descriptors.json", "inventory.img", "pages-1.img"]
    for name in os.listdir(dest):
        assert (Path(dest) / name).read_bytes() == (src / name).read_bytes()
    assert os.stat(dest).st_mode & 0o777 == 0o700


def test_off_by_default_with_the_option_that_allows_it(tmp_path: Path) -> None:
    src = images(tmp_path)
    with pytest.raises(ArchiveRestoreError, match=r"off on this node.*AllowArchiveRestore = true"):
        admit(str(src), str(tmp_path / "copy"), ArchivePolicy(keys=lambda: RING), SPEC)
    assert not (tmp_path / "copy").exists()


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (lambda d: (d / "pages-1.img").write_bytes(b"x" + (d / "pages-1.img").read_bytes()[1:]), "differs from"),
        (lambda d: (d / "pages-1.img").write_bytes((d / "pages-1.img").read_bytes()[:-1]), "attested"),
        (lambda d: (d / "extra.img").write_bytes(b""), "does not list: extra.img"),
        (lambda d: (d / "inventory.img").unlink(), "missing: inventory.img"),
        (lambda d: (d / ATTESTATION).unlink(), "no attestation"),
        (lambda d: (d / ATTESTATION).write_text("{"), "not JSON"),
        (lambda d: (d / ATTESTATION).write_text("[]"), "not a JSON object"),
        (lambda d: _rewrite(d, files=[]), "does not authenticate"),
        (lambda d: _rewrite(d, seal={"alg": "none"}), "does not authenticate"),
        (lambda d: (d / ATTESTATION).write_text('{"files": NaN}'), "not JSON"),
        (lambda d: (d / ATTESTATION).write_text("[" * 100_000 + "]" * 100_000), "not JSON"),
    ],
    ids=[
        "byte-changed",
        "truncated",
        "extra-file",
        "missing-file",
        "unattested",
        "bad-json",
        "not-object",
        "list-rewritten",
        "seal-dropped",
        "nan",
        "deep",
    ],
)
def test_anything_changed_is_refused_and_nothing_is_left(tmp_path: Path, damage: Any, why: str) -> None:
    src = images(tmp_path)
    damage(src)
    with pytest.raises(ArchiveRestoreError, match=why):
        admit(str(src), str(tmp_path / "copy"), ATTESTED, SPEC)
    assert not (tmp_path / "copy").exists()


def _rewrite(d: Path, **fields: Any) -> None:
    doc = json.loads((d / ATTESTATION).read_text())
    doc.update(fields)
    (d / ATTESTATION).write_text(json.dumps(doc))


def test_an_archive_of_another_key_or_security_context_is_refused(tmp_path: Path) -> None:
    src = images(tmp_path, ring=OTHER)
    with pytest.raises(ArchiveRestoreError, match="does not authenticate"):
        admit(str(src), str(tmp_path / "copy"), ATTESTED, SPEC)
    privileged = {"process": {"user": {"uid": 0}, "capabilities": {"bounding": ["CAP_SYS_ADMIN"]}}}
    (tmp_path / "p").mkdir()
    src2 = images(tmp_path / "p", spec=privileged)
    with pytest.raises(ArchiveRestoreError, match="another security context"):
        admit(str(src2), str(tmp_path / "copy"), ATTESTED, SPEC)


def test_without_a_key_nothing_authenticates(tmp_path: Path) -> None:
    src = images(tmp_path)
    with pytest.raises(ArchiveRestoreError, match="no store key"):
        admit(str(src), str(tmp_path / "copy"), ArchivePolicy(allow=True), SPEC)


def test_unauthenticated_archives_when_allowed_still_get_the_file_checks(tmp_path: Path) -> None:
    lax = ArchivePolicy(allow=True, allow_unauthenticated=True)
    src = images(tmp_path, ring=None)
    admitted = admit(str(src), str(tmp_path / "copy"), lax, SPEC)
    assert not admitted.authenticated
    dest = admitted.path
    assert sorted(os.listdir(dest)) == ["descriptors.json", "inventory.img", "pages-1.img"]
    os.symlink("/etc/shadow", src / "core-1.img")
    with pytest.raises(ArchiveRestoreError, match=r"core-1\.img: not a regular file"):
        admit(str(src), str(tmp_path / "copy2"), lax, SPEC)
    (src / "core-1.img").unlink()
    os.mkfifo(src / "fifo.img")
    with pytest.raises(ArchiveRestoreError, match=r"fifo\.img: not a regular file"):
        admit(str(src), str(tmp_path / "copy2"), lax, SPEC)
    (src / "fifo.img").unlink()
    (src / "sub").mkdir()
    with pytest.raises(ArchiveRestoreError, match="sub: not a regular file"):
        admit(str(src), str(tmp_path / "copy2"), lax, SPEC)
    assert not (tmp_path / "copy2").exists()


def test_a_linked_images_folder_is_not_followed(tmp_path: Path) -> None:
    src = images(tmp_path)
    os.symlink(src, tmp_path / "link")
    with pytest.raises(ArchiveRestoreError, match="checkpoint images"):
        admit(str(tmp_path / "link"), str(tmp_path / "copy"), ATTESTED, SPEC)


def test_images_beyond_the_memory_limit_are_refused_before_copying(tmp_path: Path) -> None:
    src = images(tmp_path)
    (src / "pages-2.img").write_bytes(b"")
    os.truncate(src / "pages-2.img", 200 << 20)  # sparse: declared, never read
    lax = ArchivePolicy(allow=True, allow_unauthenticated=True)
    limited = {**SPEC, "linux": {"resources": {"memory": {"limit": 64 << 20}}}}
    with pytest.raises(ArchiveRestoreError, match="exceed the container's memory limit"):
        admit(str(src), str(tmp_path / "copy"), lax, limited)
    assert not (tmp_path / "copy").exists()


def test_a_key_that_cannot_be_loaded_refuses_with_its_reason(tmp_path: Path) -> None:
    def broken() -> KeyRing:
        raise OSError("key file /etc/hotrestart/store-key: permission denied")

    src = images(tmp_path)
    with pytest.raises(ArchiveRestoreError, match="permission denied"):
        admit(str(src), str(tmp_path / "copy"), ArchivePolicy(allow=True, keys=broken), SPEC)


def test_only_the_files_the_shim_wrote_are_attested(tmp_path: Path) -> None:
    src = images(tmp_path, ring=None)
    (src / "planted.img").write_bytes(b"not from CRIU")
    attest(str(src), RING, SPEC, "c1", ["inventory.img", "pages-1.img", "descriptors.json"])
    with pytest.raises(ArchiveRestoreError, match=r"does not list: planted\.img"):
        admit(str(src), str(tmp_path / "copy"), ATTESTED, SPEC)


def test_an_existing_destination_is_never_reused(tmp_path: Path) -> None:
    src = images(tmp_path)
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "keep").write_text("someone else's")
    with pytest.raises(FileExistsError):
        admit(str(src), str(tmp_path / "copy"), ATTESTED, SPEC)
    assert (tmp_path / "copy" / "keep").read_text() == "someone else's"
