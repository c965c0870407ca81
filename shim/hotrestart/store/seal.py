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

The ring is read from a key file or a key directory (`keyfile`, which also describes
rotation); whether a store needs a key at all is `locality`'s question.
"""

from __future__ import annotations

import hmac
import json
import re
import secrets
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from hotrestart.errors import StoreError

ALG = "aes-256-gcm+hkdf-sha256"
KEY_BYTES = 32
SALT_BYTES = 16
TAG_BYTES = 16  # appended to each sealed chunk
MAX_KEYS = 64

KEY_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
_CHUNK_INFO = b"hotrestart.io/seal/v1 chunk key\0"
_MAC_INFO = b"hotrestart.io/seal/v1 manifest key\0"
_AAD = b"hotrestart.io/seal/v1 chunk\0"


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
            if not KEY_NAME.fullmatch(name):
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


# `cryptography` (OpenSSL's bindings) is imported only where a key is used: every shim on
# the node imports this module, and most nodes run without a key.


def _derive(key: bytes, salt: bytes, info: bytes, checkpoint_id: str) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=info + checkpoint_id.encode())
    return hkdf.derive(key)


def purpose_key(ring: KeyRing, name: str, salt: bytes, purpose: bytes) -> bytes:
    """A key of the ring's key `name` for another use than sealing checkpoints: `purpose` is
    the HKDF info, which must not start like a checkpoint key's (`hotrestart.io/seal/`), so
    that no MAC made with it can stand for a checkpoint's or the reverse."""
    if purpose.startswith(b"hotrestart.io/seal/"):
        raise SealError("a purpose key cannot share the checkpoint keys' label")
    return _derive(ring.key(name), salt, purpose, "")


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
