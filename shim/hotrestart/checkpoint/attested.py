"""CRIU images that containerd hands over at create: a CRI checkpoint archive, `ctr`'s checkpoint.

containerd 2.1-2.3 create a container from a checkpoint archive given as its image: they
unpack it and pass its `checkpoint/` folder to Create, and the shim restores those images
as root. Whoever may create pods chooses the archive, and CRIU trusts its images (mount
tables, file paths, namespaces, credentials), so a crafted archive would be root on the
node. Hence:

- Restoring from given images is off unless the runtime options set `AllowArchiveRestore`.
- Then only images this shim attested restore. A Task.Checkpoint through this shim on a node
  with a store key writes `ATTESTATION` beside the images (containerd carries the whole folder
  into the archive): the size and sha256 of every file, the security context of the container
  they were taken from, and an HMAC under the store key. A restore needs every file as
  attested and no other, and the same security context (CRIU restores credentials,
  capabilities and seccomp from the images, not from the new spec).
- `AllowUnauthenticatedArchives` drops the attestation: whoever may create pods may then run
  anything as root on the node.
- In every mode the images are read beneath a directory descriptor (regular files only, no
  links followed), capped in count and size, and copied into a folder of the shim's own,
  hashed on the way: what CRIU reads is what was checked.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any

from hotrestart.checkpoint.compat import security_digest
from hotrestart.errors import ArchiveRestoreError
from hotrestart.store.manifest import MAX_FILES, MAX_MANIFEST
from hotrestart.store.seal import SALT_BYTES, KeyRing, SealError, canonical, purpose_key

log = logging.getLogger(__name__)

ATTESTATION = "hotrestart-attestation.json"
FORMAT = "hotrestart.io/attested-images/v1"
ALG = "hmac-sha256+hkdf-sha256"
# The HKDF label of the attestation key: unlike every checkpoint key's, so an attestation's
# MAC can never stand for a stored checkpoint's, nor one of those for an attestation.
_PURPOSE = b"hotrestart.io/attest/v1 images key\0"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
_BLOCK = 8 << 20
MEMORY_SLACK = 64 << 20  # CRIU's images carry some metadata beyond the pages themselves

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


@dataclasses.dataclass(frozen=True, slots=True)
class ArchivePolicy:
    """What the runtime options allow for images given at create."""

    allow: bool = False
    allow_unauthenticated: bool = False
    # The store key ring, loaded when asked (None: the node has no key); raises SealError
    # when a key is configured but cannot be loaded.
    keys: Callable[[], KeyRing | None] = lambda: None

    @property
    def mode(self) -> str:
        if not self.allow:
            return "off"
        return "any archive (unauthenticated)" if self.allow_unauthenticated else "attested archives only"


# -- writing ---------------------------------------------------------------------------------


def attest(images: str, ring: KeyRing, spec: Mapping[str, Any], container: str, names: Collection[str]) -> None:
    """Write `ATTESTATION` into `images` for the files `names`, which this shim just wrote
    there; anything else in the folder stays unattested (and so refuses a restore)."""
    dir_fd = os.open(images, _DIR_FLAGS)
    try:
        files = []
        for name in sorted(set(names)):
            if name == ATTESTATION or not _NAME.fullmatch(name):
                continue
            fd = _open_regular(dir_fd, name)
            try:
                size, digest = _digest(fd)
            finally:
                os.close(fd)
            files.append([name, size, digest])
        salt = secrets.token_bytes(SALT_BYTES)
        doc: dict[str, Any] = {
            "format": FORMAT,
            "container": container,
            "taken": round(time.time(), 3),
            "security": security_digest(spec),
            "files": files,
            "seal": {"alg": ALG, "key": ring.active, "salt": salt.hex(), "mac": ""},
        }
        doc["seal"]["mac"] = _mac(ring, ring.active, salt, doc).hex()
        body = json.dumps(doc, sort_keys=True, indent=1).encode()
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(ATTESTATION, flags, 0o600, dir_fd=dir_fd)
        try:
            _write_all(fd, body)
        finally:
            os.close(fd)
    finally:
        os.close(dir_fd)


# -- reading ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Admitted:
    path: str  # the checked copy to restore from
    authenticated: bool  # False: admitted only because unauthenticated archives are allowed


def admit(given: str, dest: str, policy: ArchivePolicy, spec: Mapping[str, Any]) -> Admitted:
    """Check the images in `given` as `policy` allows and copy them into `dest` (created new,
    0700; it must not exist). Raises ArchiveRestoreError with the reason when refused,
    leaving nothing at `dest`."""
    if not policy.allow:
        raise ArchiveRestoreError(
            "restoring from a checkpoint archive is off on this node: CRIU trusts its images, so "
            "whoever may create pods could run code as root on the node; an administrator can allow "
            "archives taken through this shim with AllowArchiveRestore = true in the runtime's "
            "options (see SECURITY.md)"
        )
    try:
        dir_fd = os.open(given, _DIR_FLAGS)
    except OSError as exc:
        raise ArchiveRestoreError(f"checkpoint images {given}: {os.strerror(exc.errno or 0)}") from None
    try:
        names = _names(dir_fd)
        expected, authenticated = _expected(dir_fd, names, policy, spec)
        _check_room(expected, spec, dest)
        _copy_all(dir_fd, expected, dest)
    finally:
        os.close(dir_fd)
    return Admitted(dest, authenticated)


def _names(dir_fd: int) -> list[str]:
    names: list[str] = []
    for entry in os.scandir(dir_fd):
        if len(names) >= MAX_FILES:
            raise ArchiveRestoreError(f"checkpoint images: more than {MAX_FILES} files")
        if not _NAME.fullmatch(entry.name):
            raise ArchiveRestoreError(f"checkpoint images: unexpected file name {entry.name!r}")
        # Refused before it is opened: opening a device can act on it, a FIFO can block.
        if not entry.is_file(follow_symlinks=False):
            raise ArchiveRestoreError(f"checkpoint image {entry.name}: not a regular file")
        names.append(entry.name)
    return names


def _expected(
    dir_fd: int, names: list[str], policy: ArchivePolicy, spec: Mapping[str, Any]
) -> tuple[dict[str, tuple[int, str]], bool]:
    """The files to copy: name -> (size, sha256), "" when nothing vouches for the content;
    and whether the attestation vouched for them."""
    try:
        ring = policy.keys()
    except (SealError, OSError) as exc:
        if not policy.allow_unauthenticated:
            raise ArchiveRestoreError(f"the store key cannot be loaded, so no archive authenticates: {exc}") from None
        ring = None
    problem = ""
    if ATTESTATION not in names:
        problem = "the archive was not taken through this shim with a store key (it has no attestation)"
    elif ring is None:
        problem = "this node has no store key to authenticate the archive with"
    else:
        try:
            return _authenticated(dir_fd, names, ring, spec), True
        except ArchiveRestoreError as exc:
            problem = str(exc)
    if not policy.allow_unauthenticated:
        raise ArchiveRestoreError(f"checkpoint archive refused: {problem}")
    log.warning("restoring checkpoint images that are not authenticated (AllowUnauthenticatedArchives): %s", problem)
    unvouched: dict[str, tuple[int, str]] = {}
    for name in names:
        if name == ATTESTATION:
            continue
        fd = _open_regular(dir_fd, name)
        try:
            unvouched[name] = (os.fstat(fd).st_size, "")
        finally:
            os.close(fd)
    return unvouched, False


def _authenticated(dir_fd: int, names: list[str], ring: KeyRing, spec: Mapping[str, Any]) -> dict[str, tuple[int, str]]:
    doc = _read_attestation(dir_fd)
    _verify(ring, doc)
    # Authentic from here on: the content is this shim's own, but still checked for shape.
    if doc.get("format") != FORMAT:
        raise ArchiveRestoreError(f"its attestation is of format {doc.get('format')!r}, not {FORMAT!r}")
    if doc.get("security") != security_digest(spec):
        raise ArchiveRestoreError(
            f"it was taken from a container with another security context (user, capabilities, seccomp, "
            f"LSM labels, namespaces, rlimits) than this one's; container {doc.get('container')!r}"
        )
    files = doc.get("files")
    if not isinstance(files, list) or len(files) > MAX_FILES:
        raise ArchiveRestoreError("its attestation's file list is malformed")
    expected: dict[str, tuple[int, str]] = {}
    for item in files:
        if not (
            isinstance(item, list)
            and len(item) == 3
            and isinstance(item[0], str)
            and _NAME.fullmatch(item[0])
            and item[0] != ATTESTATION
            and isinstance(item[1], int)
            and not isinstance(item[1], bool)
            and item[1] >= 0
            and isinstance(item[2], str)
            and re.fullmatch(r"[0-9a-f]{64}", item[2])
            and item[0] not in expected
        ):
            raise ArchiveRestoreError("its attestation's file list is malformed")
        expected[item[0]] = (item[1], item[2])
    present = set(names) - {ATTESTATION}
    if extra := sorted(present - set(expected)):
        raise ArchiveRestoreError(f"it holds files its attestation does not list: {', '.join(extra[:5])}")
    if missing := sorted(set(expected) - present):
        raise ArchiveRestoreError(f"files its attestation lists are missing: {', '.join(missing[:5])}")
    return expected


def _mac(ring: KeyRing, name: str, salt: bytes, doc: Mapping[str, Any]) -> bytes:
    return hmac.digest(purpose_key(ring, name, salt, _PURPOSE), canonical(doc), "sha256")


def _verify(ring: KeyRing, doc: Mapping[str, Any]) -> None:
    """Raise unless `doc` authenticates with a key of the ring; nothing else of it is used before."""
    seal = doc.get("seal")
    if not isinstance(seal, Mapping) or seal.get("alg") != ALG:
        raise ArchiveRestoreError(f"its attestation does not authenticate: not sealed with {ALG}")
    name, salt_hex, mac_hex = seal.get("key"), seal.get("salt"), seal.get("mac")
    if not (isinstance(name, str) and isinstance(salt_hex, str) and isinstance(mac_hex, str)):
        raise ArchiveRestoreError("its attestation does not authenticate: its seal lacks a key, salt or MAC")
    try:
        salt, given = bytes.fromhex(salt_hex), bytes.fromhex(mac_hex)
        expected = _mac(ring, name, salt, doc)
    except (ValueError, SealError) as exc:  # an unknown key, a malformed salt; NaN and the like
        raise ArchiveRestoreError(f"its attestation does not authenticate: {exc}") from None
    # compare_digest takes time independent of where the bytes differ.
    if len(salt) != SALT_BYTES or not hmac.compare_digest(expected, given):
        raise ArchiveRestoreError(f"its attestation does not authenticate with store key {name!r}")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _read_attestation(dir_fd: int) -> dict[str, Any]:
    fd = _open_regular(dir_fd, ATTESTATION)
    try:
        if os.fstat(fd).st_size > MAX_MANIFEST:
            raise ArchiveRestoreError(f"its attestation is over {MAX_MANIFEST >> 20} MiB")
        data = b""
        while len(data) <= MAX_MANIFEST and (block := os.read(fd, 1 << 20)):
            data += block
    finally:
        os.close(fd)
    if len(data) > MAX_MANIFEST:
        raise ArchiveRestoreError(f"its attestation is over {MAX_MANIFEST >> 20} MiB")
    try:
        doc = json.loads(data, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise ArchiveRestoreError(f"its attestation is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ArchiveRestoreError("its attestation is not a JSON object")
    return doc


def _check_room(expected: Mapping[str, tuple[int, str]], spec: Mapping[str, Any], dest: str) -> None:
    total = sum(size for size, _ in expected.values())
    memory = ((spec.get("linux") or {}).get("resources") or {}).get("memory") or {}
    limit = memory.get("limit") if isinstance(memory, Mapping) else None
    if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 and total > limit + MEMORY_SLACK:
        raise ArchiveRestoreError(
            f"checkpoint images ({total >> 20} MiB) exceed the container's memory limit ({limit >> 20} MiB)"
        )
    st = os.statvfs(os.path.dirname(dest) or ".")
    if total > st.f_bavail * st.f_frsize:
        raise ArchiveRestoreError(f"checkpoint images ({total >> 20} MiB) do not fit in {os.path.dirname(dest)}")


def _copy_all(dir_fd: int, expected: Mapping[str, tuple[int, str]], dest: str) -> None:
    os.mkdir(dest, 0o700)  # never one that exists: a name of the caller's, unique
    try:
        out_dir = os.open(dest, _DIR_FLAGS)
        try:
            for name, (size, digest) in expected.items():
                _copy_one(dir_fd, out_dir, name, size, digest)
        finally:
            os.close(out_dir)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def _copy_one(dir_fd: int, out_dir: int, name: str, size: int, digest: str) -> None:
    src = _open_regular(dir_fd, name)
    try:
        if os.fstat(src).st_size != size:
            raise ArchiveRestoreError(f"checkpoint image {name}: {os.fstat(src).st_size} bytes, attested {size}")
        dst = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=out_dir)
        try:
            h = hashlib.sha256()
            copied = 0
            # Never more than the size checked: a file that grows meanwhile is caught below.
            while copied <= size and (block := os.read(src, min(_BLOCK, size + 1 - copied))):
                h.update(block)
                _write_all(dst, block)
                copied += len(block)
        finally:
            os.close(dst)
    finally:
        os.close(src)
    if copied != size:
        raise ArchiveRestoreError(f"checkpoint image {name} changed while it was read")
    if digest and h.hexdigest() != digest:
        raise ArchiveRestoreError(f"checkpoint archive refused: image {name} differs from what was attested")


def _open_regular(dir_fd: int, name: str) -> int:
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):
            raise ArchiveRestoreError(f"checkpoint image {name}: not a regular file") from None
        raise ArchiveRestoreError(f"checkpoint image {name}: {os.strerror(exc.errno or 0)}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ArchiveRestoreError(f"checkpoint image {name}: not a regular file")
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _digest(fd: int) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    while block := os.read(fd, _BLOCK):
        h.update(block)
        size += len(block)
    return size, h.hexdigest()
