"""The store key: authenticated manifests and chunks encrypted at rest.

With a store key, a checkpoint's manifest carries an HMAC-SHA256 over its canonical form
(which lists the digest of every chunk, so it binds all of them), and every stored chunk is
an AES-256-GCM ciphertext. The manifest's key is derived per checkpoint with HKDF-SHA256
from a key of the ring, a random salt kept in the manifest and the checkpoint id, so no
manifest can stand for another checkpoint. A checkpoint that does not authenticate is
never restored. All primitives come from `cryptography` (OpenSSL): AES-GCM runs on AES-NI
and releases the GIL, so worker threads seal and open chunks in parallel.

Chunks are content-addressed and shared between checkpoints (`chunkcodec`), so their keys
are derived per ring key, not per checkpoint (`ChunkKeys`): a chunk's name is a keyed
BLAKE3 digest of its plain bytes, and its nonce is taken from that name. Equal plaintexts
give equal ciphertexts under one key (that is what lets them be stored once), distinct
ones never share a nonce short of a 96-bit digest collision, and without the key a name
tells nothing about the bytes. What the store's reader learns is which chunks are equal.

Writing: `ring.sealer(id)` signs the manifest (its `seal` field is `seal_info()`, its MAC
`sign(canonical(manifest))`), and `chunk_keys(ring.active)` names and seals the chunks.
Reading: `ring.opener(manifest["seal"], id)`, `verify(canonical(manifest), mac)` before
anything else is trusted, then the chunk keys of the manifest's key name open each chunk.

The ring is read from a key file or a key directory (`keyfile`, which also describes
rotation); whether a store needs a key at all is `locality`'s question.
"""

from __future__ import annotations

import hmac
import json
import re
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from hotrestart.errors import StoreError

ALG = "aes-256-gcm+blake3+hkdf-sha256"
KEY_BYTES = 32
SALT_BYTES = 16
TAG_BYTES = 16  # appended to each sealed chunk
MAX_KEYS = 64

KEY_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
_MAC_INFO = b"hotrestart.io/seal/v1 manifest key\0"
_CHUNK_INFO = b"hotrestart.io/seal/v2 chunk key\0"
_NAME_INFO = b"hotrestart.io/seal/v2 chunk name key\0"
_AAD = b"hotrestart.io/seal/v2 chunk\0"
NONCE_BYTES = 12


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
        self._chunk_keys: dict[str, ChunkKeys] = {}

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

    def chunk_keys(self, name: str) -> ChunkKeys:
        """The chunk keys of the ring's key `name` (the same on every node with that key)."""
        found = self._chunk_keys.get(name)
        if found is None:
            found = self._chunk_keys[name] = ChunkKeys(name, self.key(name))
        return found

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
    """The manifest key of one checkpoint, derived from a ring key, its salt and its id."""

    def __init__(self, key: bytes, salt: bytes, checkpoint_id: str) -> None:
        if not checkpoint_id or "\0" in checkpoint_id:
            raise SealError(f"checkpoint id {checkpoint_id!r} cannot be sealed")  # \0 ends it in the key info
        self.checkpoint_id = checkpoint_id
        self._mac_key = _derive(key, salt, _MAC_INFO, checkpoint_id)

    def mac(self, body: bytes) -> bytes:
        return hmac.digest(self._mac_key, body, "sha256")


class ChunkKeys:
    """What names, seals and opens chunks under one ring key; shared by worker threads
    (AESGCM copies its keyed context for each call)."""

    def __init__(self, name: str, key: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self.name = name
        self.name_key = _derive(key, b"", _NAME_INFO, "")  # BLAKE3's key for chunk names
        self._aead = AESGCM(_derive(key, b"", _CHUNK_INFO, ""))
        # Where this key's chunks live: one key's names mean nothing under another.
        self.space = "k-" + hmac.digest(self.name_key, b"space", "sha256").hex()[:24]

    def _nonce(self, digest: bytes) -> tuple[bytes, bytes]:
        if len(digest) != KEY_BYTES:
            raise SealError("a chunk name is 32 bytes")
        return digest[:NONCE_BYTES], _AAD + digest

    def seal_into(self, digest: bytes, plaintext: Readable, out: Writable) -> int:
        """Seal a chunk named `digest` into the start of `out`; returns len(plaintext) + TAG_BYTES."""
        nonce, aad = self._nonce(digest)
        n = len(plaintext) + TAG_BYTES
        with memoryview(out) as whole, whole[:n] as target:
            if len(target) != n:
                raise ValueError(f"output buffer holds {len(target)} bytes, the sealed chunk {n}")
            return self._aead.encrypt_into(nonce, plaintext, aad, target)

    def open_into(self, digest: bytes, ciphertext: Readable, out: Writable) -> int:
        """Open a chunk named `digest` into the start of `out`; returns its length. Raises
        if it was altered, truncated or stored under another name; `out` may then hold
        bytes that did not authenticate: never use them."""
        from cryptography.exceptions import InvalidTag

        nonce, aad = self._nonce(digest)
        n = len(ciphertext) - TAG_BYTES
        if n < 0:
            raise SealError(f"chunk {digest.hex()[:16]} does not authenticate")
        with memoryview(out) as whole, whole[:n] as target:
            if len(target) != n:
                raise ValueError(f"output buffer holds {len(target)} bytes, the opened chunk {n}")
            try:
                return self._aead.decrypt_into(nonce, ciphertext, aad, target)
            except InvalidTag:
                raise SealError(f"chunk {digest.hex()[:16]} does not authenticate") from None


class Sealer:
    """Signs the manifest of one checkpoint being written."""

    def __init__(self, ring: KeyRing, checkpoint_id: str) -> None:
        self._name = ring.active
        # Never chosen by the caller: a fresh salt makes the manifest key new even when a
        # checkpoint id is used again.
        self._salt = secrets.token_bytes(SALT_BYTES)
        self._keys = _Keys(ring.key(self._name), self._salt, checkpoint_id)
        self.chunks = ring.chunk_keys(self._name)
        self._mac = ""

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
        self.chunks = ring.chunk_keys(name)

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


def canonical(manifest: Mapping[str, Any]) -> bytes:
    """The bytes a manifest's MAC covers: its parsed JSON, minus the MAC itself.

    Computed from the parsed document, not the file's bytes, so what is checked is
    exactly what is used (a duplicated field cannot hide from the MAC)."""
    data = dict(manifest)
    seal = data.get("seal")
    if isinstance(seal, Mapping):
        data["seal"] = {k: v for k, v in seal.items() if k != "mac"}
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()
