"""The store key: authenticated manifests and chunks encrypted at rest.

With a store key, a checkpoint's manifest carries an HMAC-SHA256 over its canonical form
(which lists the sha256 of every stored chunk, so it binds all of them), and every stored
chunk is an AES-256-GCM ciphertext. Both keys are derived per checkpoint with HKDF-SHA256
from a key of the ring, a random salt kept in the manifest and the checkpoint id, so a
nonce built from the chunk's position is never used twice under one key, and no chunk or
manifest can be moved from one checkpoint, file or position to another. A checkpoint
that does not authenticate is never restored. All primitives come from `cryptography`
(OpenSSL): AES-GCM runs on AES-NI and releases the GIL, so the archive's worker threads
seal and open chunks in parallel.

Writing: `ring.sealer(id)` seals each stored chunk (the compressed frame, so the chunk
sha256s in the manifest are of sealed bytes and a store is checked without the key); the
manifest's `seal` field is `seal_info()`, and its MAC `sign(canonical(manifest))`.
Reading: `ring.opener(manifest["seal"], id)`, `verify(canonical(manifest), mac)` before
anything else is trusted, then `open_chunk` for each chunk. A chunk that opens is
authentic: its key is the checkpoint's and its nonce its position.

Key file
--------
One key per line, `<name>:<base64 of 32 random bytes>`; blank lines and lines starting
with `#` are ignored. The first key seals new checkpoints; every key opens them. Names
are 1-64 of `A-Z a-z 0-9 . _ -`, not starting with a dot, and are written into each
manifest. The file must be a regular file (not a symbolic link) owned by root with no
rights for group or others, and at most 64 KiB. Every node that shares a store needs the
same keys: create the file once and copy it to each node::

    install -m 0600 -o root /dev/null /etc/hotrestart/store-key
    echo "k$(date +%Y%m%d):$(head -c 32 /dev/urandom | base64 -w0)" >> /etc/hotrestart/store-key

Key directory (a Kubernetes Secret mounted as a volume)
-------------------------------------------------------
Each file is one key named by its file name, holding the base64 text of 32 random bytes.
A file `active` holds the name of the key that seals; it is required when there is more
than one key, so that adding a key never changes which one seals (a node that has not
received the new key yet could not read what others seal with it). Names starting with a
dot are skipped: they are the Secret volume's own layout (`..data`), whose links are
followed as long as they stay inside the directory. Each key file must be owned by root
with no rights for group or others: mount it with `defaultMode: 0400` and no `fsGroup`::

    kubectl -n kube-system create secret generic hotrestart-store-key \\
        --from-literal=k20250101="$(head -c 32 /dev/urandom | base64 -w0)" \\
        --from-literal=active=k20250101

Rotation
--------
1. Add the new key everywhere, not sealing yet: every node then opens both. In the key
   file, as a line after the first, the same line on every node::

       line="k20250601:$(head -c 32 /dev/urandom | base64 -w0)"   # once
       echo "$line" >> /etc/hotrestart/store-key                    # on each node

   In the Secret::

       kubectl -n kube-system patch secret hotrestart-store-key --type merge -p \\
           "{\\"stringData\\":{\\"k20250601\\":\\"$(head -c 32 /dev/urandom | base64 -w0)\\"}}"

2. Once every node has it, make it seal: move its line first in the key file, or::

       kubectl -n kube-system patch secret hotrestart-store-key --type merge \\
           -p '{"stringData":{"active":"k20250601"}}'

3. Once no checkpoint sealed with the old key is wanted any more (retention removes them;
   one that no longer opens means a cold start, never a failed one), remove the old key:
   its line, or::

       kubectl -n kube-system patch secret hotrestart-store-key --type json \\
           -p '[{"op":"remove","path":"/data/k20250101"}]'
"""

from __future__ import annotations

import base64
import binascii
import errno
import hmac
import json
import os
import re
import secrets
import stat
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from hotrestart.errors import StoreError

ALG = "aes-256-gcm+hkdf-sha256"
KEY_BYTES = 32
SALT_BYTES = 16
TAG_BYTES = 16  # appended to each sealed chunk
MAX_KEY_FILE = 64 << 10
MAX_KEYS = 64
ACTIVE = "active"  # in a key directory: the file naming the key that seals

_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
_CHUNK_INFO = b"hotrestart.io/seal/v1 chunk key\0"
_MAC_INFO = b"hotrestart.io/seal/v1 manifest key\0"
_AAD = b"hotrestart.io/seal/v1 chunk\0"

# Filesystems known to live on this node alone. Any other type (nfs, cifs, ceph, fuse.*,
# 9p, virtiofs, lustre, ...) could be read or written by another machine, and so is not
# node-local: an unknown type needs a key too, rather than trusting a guess.
LOCAL_FILESYSTEMS = frozenset(
    {
        "ext2",
        "ext3",
        "ext4",
        "xfs",
        "btrfs",
        "zfs",
        "f2fs",
        "bcachefs",
        "jfs",
        "reiserfs",
        "nilfs2",
        "tmpfs",
        "ramfs",
        "overlay",
        "vfat",
        "exfat",
    }
)


Readable = bytes | bytearray | memoryview
Writable = bytearray | memoryview  # what the `_into` methods (cryptography 47 and later) write to


class SealError(StoreError):
    """A key ring cannot be used, or a checkpoint does not authenticate."""


class KeyRing:
    """The store keys: the active one seals, every one opens."""

    def __init__(self, keys: Sequence[tuple[str, bytes]]) -> None:
        if not keys:
            raise SealError("the store key ring is empty")
        self._keys: dict[str, bytes] = {}
        for name, key in keys:
            if not _NAME.fullmatch(name):
                raise SealError(f"store key name {name!r} is not 1-64 of A-Z a-z 0-9 . _ - (no leading dot)")
            if name in self._keys:
                raise SealError(f"store key {name!r} is listed twice")
            if len(key) != KEY_BYTES:
                raise SealError(f"store key {name!r} is {len(key)} bytes, not {KEY_BYTES}")
            self._keys[name] = bytes(key)
        if len(self._keys) > MAX_KEYS:
            raise SealError(f"more than {MAX_KEYS} store keys")
        self.active = keys[0][0]

    def __repr__(self) -> str:  # never the key material, in logs or tracebacks
        return f"KeyRing(active={self.active!r}, names={list(self._keys)!r})"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def key(self, name: str) -> bytes:
        try:
            return self._keys[name]
        except KeyError:
            raise SealError(
                f"checkpoint sealed with store key {name!r}, which is not in the key ring ({', '.join(self._keys)})"
            ) from None

    def sealer(self, checkpoint_id: str) -> Sealer:
        return Sealer(self, checkpoint_id)

    def opener(self, seal: Mapping[str, Any], checkpoint_id: str) -> Opener:
        return Opener(self, seal, checkpoint_id)

    @classmethod
    def load(cls, path: str, *, owner: int = 0) -> KeyRing:
        """Read a key file or key directory (see the module's docstring).

        `owner` is the uid the key files must belong to (root; tests pass their own)."""
        try:
            # O_NONBLOCK: a FIFO put in the key's place must not hang the shim on open.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise SealError(f"store key {path}: {_why(exc)}") from exc
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                return cls(_load_dir(path, fd, owner))
            return cls(_parse_file(path, _read_key_file(path, fd, owner)))
        finally:
            os.close(fd)


def _why(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "is a symbolic link; give the file itself"
    return exc.strerror or str(exc)


def _read_key_file(path: str, fd: int, owner: int) -> bytes:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise SealError(f"store key {path}: not a regular file")
    if st.st_uid != owner:
        raise SealError(f"store key {path}: owned by uid {st.st_uid}, must be owned by uid {owner}")
    if st.st_mode & 0o077:
        raise SealError(
            f"store key {path}: mode {stat.S_IMODE(st.st_mode):04o} gives group or others access; chmod 0600 or 0400"
        )
    if st.st_size > MAX_KEY_FILE:
        raise SealError(f"store key {path}: larger than {MAX_KEY_FILE} bytes")
    data = b""
    while len(data) <= MAX_KEY_FILE:  # the size may have changed since fstat
        more = os.read(fd, MAX_KEY_FILE + 1 - len(data))
        if not more:
            break
        data += more
    if len(data) > MAX_KEY_FILE:
        raise SealError(f"store key {path}: larger than {MAX_KEY_FILE} bytes")
    return data


def _decode_key(where: str, name: str, text: str) -> bytes:
    # Errors name the key, never echo its text.
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SealError(f"{where}: key {name!r} is not base64") from None
    if len(key) != KEY_BYTES:
        raise SealError(f"{where}: key {name!r} is {len(key)} bytes, not {KEY_BYTES}")
    return key


def _parse_file(path: str, data: bytes) -> list[tuple[str, bytes]]:
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise SealError(f"store key {path}: not ASCII text") from None
    keys: list[tuple[str, bytes]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, colon, value = line.partition(":")
        name = name.strip()
        where = f"store key {path}, line {number}"
        if not colon:
            raise SealError(f"{where}: not <name>:<base64 key>")
        if not _NAME.fullmatch(name):
            raise SealError(f"{where}: key name {name!r} is not 1-64 of A-Z a-z 0-9 . _ - (no leading dot)")
        if any(n == name for n, _ in keys):
            raise SealError(f"{where}: key {name!r} is listed twice")
        keys.append((name, _decode_key(where, name, value)))
    if not keys:
        raise SealError(f"store key {path}: no keys")
    return keys


def _load_dir(path: str, dir_fd: int, owner: int) -> list[tuple[str, bytes]]:
    # The directory itself may be world-writable with the sticky bit (a Secret volume is);
    # what counts is that each key file is root's and private, checked on the open file.
    base = os.path.realpath(path)
    keys: dict[str, bytes] = {}
    active: str | None = None
    for name in sorted(os.listdir(dir_fd)):
        if name.startswith("."):
            continue
        target = os.path.realpath(os.path.join(base, name))
        if os.path.commonpath([base, target]) != base:
            raise SealError(f"store key {path}/{name}: leads outside the key directory")
        try:
            fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise SealError(f"store key {path}/{name}: {_why(exc)}") from exc
        try:
            data = _read_key_file(f"{path}/{name}", fd, owner)
        finally:
            os.close(fd)
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            raise SealError(f"store key {path}/{name}: not ASCII text") from None
        if name == ACTIVE:
            active = text.strip()
            continue
        if not _NAME.fullmatch(name):
            raise SealError(f"store key {path}/{name}: key name is not 1-64 of A-Z a-z 0-9 . _ -")
        if len(keys) >= MAX_KEYS:
            raise SealError(f"store key {path}: more than {MAX_KEYS} keys")
        keys[name] = _decode_key(f"store key {path}", name, text)
    if not keys:
        raise SealError(f"store key {path}: no keys")
    if active is None:
        if len(keys) > 1:
            raise SealError(f"store key {path}: {len(keys)} keys and no file {ACTIVE!r} naming the one that seals")
        (active,) = keys
    if active not in keys:
        raise SealError(f"store key {path}: {ACTIVE!r} names {active!r}, which is not one of its keys")
    return [(active, keys[active])] + [(n, k) for n, k in keys.items() if n != active]


# `cryptography` (OpenSSL's bindings) is imported only where a key is used: every shim on
# the node imports this module, and most nodes run without a key.


def _derive(key: bytes, salt: bytes, info: bytes, checkpoint_id: str) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=info + checkpoint_id.encode())
    return hkdf.derive(key)


class _Keys:
    """The keys of one checkpoint, derived from a ring key, its salt and its id."""

    def __init__(self, key: bytes, salt: bytes, checkpoint_id: str) -> None:
        if not checkpoint_id or "\0" in checkpoint_id:
            raise SealError(f"checkpoint id {checkpoint_id!r} cannot be sealed")  # \0 ends it in the key info
        self.checkpoint_id = checkpoint_id
        self._aad = _AAD + checkpoint_id.encode() + b"\0"
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        # AESGCM copies its keyed context for each call, so the worker threads share one.
        self._aead = AESGCM(_derive(key, salt, _CHUNK_INFO, checkpoint_id))
        self._mac_key = _derive(key, salt, _MAC_INFO, checkpoint_id)

    def _position(self, file_index: int, chunk_index: int) -> tuple[bytes, bytes]:
        """The chunk's nonce and associated data."""
        if not (0 <= file_index < 1 << 32 and 0 <= chunk_index < 1 << 64):
            raise SealError(f"chunk position ({file_index}, {chunk_index}) out of range")
        position = file_index.to_bytes(4, "big") + chunk_index.to_bytes(8, "big")
        return position, self._aad + position

    def encrypt(self, file_index: int, chunk_index: int, data: Readable) -> bytes:
        nonce, aad = self._position(file_index, chunk_index)
        return self._aead.encrypt(nonce, data, aad)

    def decrypt(self, file_index: int, chunk_index: int, data: Readable) -> bytes:
        from cryptography.exceptions import InvalidTag

        nonce, aad = self._position(file_index, chunk_index)
        try:
            return self._aead.decrypt(nonce, data, aad)
        except InvalidTag:
            raise self.forged(file_index, chunk_index) from None

    def encrypt_into(self, file_index: int, chunk_index: int, data: Readable, out: Writable) -> int:
        nonce, aad = self._position(file_index, chunk_index)
        n = len(data) + TAG_BYTES
        with memoryview(out) as whole, whole[:n] as target:
            if len(target) != n:
                raise ValueError(f"output buffer holds {len(target)} bytes, the sealed chunk {n}")
            return self._aead.encrypt_into(nonce, data, aad, target)

    def decrypt_into(self, file_index: int, chunk_index: int, data: Readable, out: Writable) -> int:
        from cryptography.exceptions import InvalidTag

        nonce, aad = self._position(file_index, chunk_index)
        n = len(data) - TAG_BYTES
        if n < 0:
            raise self.forged(file_index, chunk_index)
        with memoryview(out) as whole, whole[:n] as target:
            if len(target) != n:
                raise ValueError(f"output buffer holds {len(target)} bytes, the opened chunk {n}")
            try:
                return self._aead.decrypt_into(nonce, data, aad, target)
            except InvalidTag:
                raise self.forged(file_index, chunk_index) from None

    def forged(self, file_index: int, chunk_index: int) -> SealError:
        return SealError(
            f"checkpoint {self.checkpoint_id}: chunk {chunk_index} of file {file_index} does not authenticate"
        )

    def mac(self, body: bytes) -> bytes:
        return hmac.digest(self._mac_key, body, "sha256")


class Sealer:
    """Seals one checkpoint being written; chunks may be sealed from many threads at once."""

    def __init__(self, ring: KeyRing, checkpoint_id: str) -> None:
        self._name = ring.active
        # Never chosen by the caller: a fresh salt is what makes the chunk key, and so each
        # nonce, new even when a checkpoint id is used again.
        self._salt = secrets.token_bytes(SALT_BYTES)
        self._keys = _Keys(ring.key(self._name), self._salt, checkpoint_id)
        self._used: set[tuple[int, int]] = set()
        self._lock = threading.Lock()
        self._mac = ""

    def seal_chunk(self, file_index: int, chunk_index: int, plaintext: Readable) -> bytes:
        """The chunk's ciphertext with its 16-byte tag appended."""
        self._claim(file_index, chunk_index)
        return self._keys.encrypt(file_index, chunk_index, plaintext)

    def seal_chunk_into(self, file_index: int, chunk_index: int, plaintext: Readable, out: Writable) -> int:
        """Like `seal_chunk`, into the start of `out`; returns the length, len(plaintext) + TAG_BYTES.

        For buffers the caller reuses: a fresh multi-megabyte result in a worker thread
        costs more in page faults than sealing it (glibc maps it anew each time)."""
        self._claim(file_index, chunk_index)
        return self._keys.encrypt_into(file_index, chunk_index, plaintext, out)

    def _claim(self, file_index: int, chunk_index: int) -> None:
        # A nonce used twice under one key gives away both plaintexts' XOR and the
        # authentication key: refuse a position sealed before rather than trust callers.
        with self._lock:
            if (file_index, chunk_index) in self._used:
                raise SealError(f"chunk ({file_index}, {chunk_index}) of {self._keys.checkpoint_id} sealed twice")
            self._used.add((file_index, chunk_index))

    def sign(self, manifest_body: bytes) -> str:
        """The manifest's MAC (hex), also kept for `seal_info`; `manifest_body` from `canonical`."""
        self._mac = self._keys.mac(manifest_body).hex()
        return self._mac

    def seal_info(self) -> dict[str, str]:
        """The manifest's `seal` field; `mac` is empty until `sign`."""
        return {"alg": ALG, "key": self._name, "salt": self._salt.hex(), "mac": self._mac}


class Opener:
    """Authenticates and decrypts one stored checkpoint.

    `checkpoint_id` must come from where the checkpoint was found (its folder's name), not
    from the manifest being checked, so that a checkpoint put in another's place fails.
    An unknown key name or malformed seal raises here, before anything is read."""

    def __init__(self, ring: KeyRing, seal: Mapping[str, Any], checkpoint_id: str) -> None:
        if not isinstance(seal, Mapping) or seal.get("alg") != ALG:
            alg = seal.get("alg") if isinstance(seal, Mapping) else None
            raise SealError(f"checkpoint {checkpoint_id} is sealed with {alg!r}, not {ALG!r}")
        name, salt_hex, mac_hex = seal.get("key"), seal.get("salt"), seal.get("mac")
        if not isinstance(name, str) or not isinstance(salt_hex, str) or not isinstance(mac_hex, str):
            raise SealError(f"checkpoint {checkpoint_id}: its seal lacks a key name, salt or MAC")
        try:
            salt = bytes.fromhex(salt_hex)
        except ValueError:
            raise SealError(f"checkpoint {checkpoint_id}: its salt is not hex") from None
        if len(salt) != SALT_BYTES:
            raise SealError(f"checkpoint {checkpoint_id}: its salt is {len(salt)} bytes, not {SALT_BYTES}")
        self.key_name = name
        self._keys = _Keys(ring.key(name), salt, checkpoint_id)

    def verify(self, manifest_body: bytes, mac: str) -> None:
        """Raise unless `mac` (hex) authenticates `manifest_body` (from `canonical`)."""
        expected = self._keys.mac(manifest_body)
        try:
            given = bytes.fromhex(mac)
        except (ValueError, TypeError):
            given = b""
        # compare_digest takes time independent of where the bytes differ.
        if not hmac.compare_digest(expected, given):
            raise SealError(
                f"checkpoint {self._keys.checkpoint_id}: the manifest does not authenticate with key {self.key_name!r}"
            )

    def sign(self, manifest_body: bytes) -> str:
        """A new MAC under this checkpoint's key, for a manifest rewritten after it was
        authenticated (a restore attempt counted); `manifest_body` from `canonical`."""
        return self._keys.mac(manifest_body).hex()

    def open_chunk(self, file_index: int, chunk_index: int, ciphertext: Readable) -> bytes:
        """The chunk's plaintext; raises if it was altered, truncated or moved."""
        return self._keys.decrypt(file_index, chunk_index, ciphertext)

    def open_chunk_into(self, file_index: int, chunk_index: int, ciphertext: Readable, out: Writable) -> int:
        """Like `open_chunk`, into the start of `out`; returns the length, len(ciphertext) - TAG_BYTES.

        When it raises, `out` may hold bytes that did not authenticate: never use them."""
        return self._keys.decrypt_into(file_index, chunk_index, ciphertext, out)


def canonical(manifest: Mapping[str, Any]) -> bytes:
    """The bytes a manifest's MAC covers: its parsed JSON, minus the MAC itself.

    Computed from the parsed document, not the file's bytes, so what is checked is
    exactly what is used (a duplicated field cannot hide from the MAC)."""
    data = dict(manifest)
    seal = data.get("seal")
    if isinstance(seal, Mapping):
        data["seal"] = {k: v for k, v in seal.items() if k != "mac"}
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash in paths as \ooo octal.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def filesystem_type(path: str, *, mountinfo: str = "/proc/self/mountinfo") -> str:
    """The type of the filesystem holding `path` (which need not exist yet)."""
    real = os.path.realpath(path)
    best: tuple[int, str] | None = None
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise SealError(f"cannot tell which filesystem holds {path}: {exc}") from exc
    for line in lines:
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)  # after the optional fields
            point, fstype = _unescape(fields[4]), fields[sep + 1]
        except (ValueError, IndexError):
            continue
        if real == point or real.startswith(point.rstrip("/") + "/"):
            # Longest mount point wins; of equal ones the later, mounted on top.
            if best is None or len(point) >= best[0]:
                best = (len(point), fstype)
    if best is None:
        raise SealError(f"cannot tell which filesystem holds {path}: no mount in {mountinfo}")
    return best[1]


def node_local(store_root: str, *, mountinfo: str = "/proc/self/mountinfo") -> bool:
    """Whether only this node can reach the store: not a URL, and on a local filesystem."""
    if "://" in store_root:
        return False
    return filesystem_type(store_root, mountinfo=mountinfo) in LOCAL_FILESYSTEMS


def require_key(
    store_root: str,
    ring: KeyRing | None,
    allow_unauthenticated: bool,
    *,
    mountinfo: str = "/proc/self/mountinfo",
) -> None:
    """Refuse a store that other machines can write unless checkpoints are sealed.

    Without a key, anyone who can write a shared store could have a node restore a process
    image of their making; a node-local store is as safe as the node's own disk."""
    if ring is not None or allow_unauthenticated:
        return
    if "://" in store_root:
        kind = "an object store"
    else:
        fstype = filesystem_type(store_root, mountinfo=mountinfo)
        if fstype in LOCAL_FILESYSTEMS:
            return
        kind = f"on {fstype}, not a filesystem of this node alone"
    raise SealError(
        f"checkpoint store {store_root} is {kind}: it needs a store key, "
        "or unauthenticated checkpoints allowed explicitly"
    )
