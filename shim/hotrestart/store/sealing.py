"""What the store key means for stored checkpoints, whatever holds them.

With a key, only checkpoints whose manifest authenticates are usable, every manifest
written is signed, and every chunk is named with the key and sealed (seal.py, chunkcodec);
without one, sealed checkpoints cannot be read here. A key this node lacks is not proof of corruption: such
a checkpoint is unsupported, not corrupt, and retention leaves it alone.
"""

from __future__ import annotations

import json

from hotrestart.store import seal
from hotrestart.store.chunkcodec import Codec, IntegrityError
from hotrestart.store.entry import Entry
from hotrestart.store.manifest import Manifest, ManifestError, UnsupportedManifestError
from hotrestart.store.seal import KeyRing, Opener, Sealer, SealError


class Sealing:
    def __init__(self, keys: KeyRing | None) -> None:
        self.keys = keys
        self._codecs: dict[str, Codec] = {}

    def sealer(self, cid: str) -> Sealer | None:
        """What seals checkpoint `cid` being written, when the store has a key."""
        return self.keys.sealer(cid) if self.keys is not None else None

    def opener(self, entry: Entry) -> Opener | None:
        if entry.manifest is None or not entry.manifest.seal:
            return None
        if self.keys is None:
            raise SealError(f"checkpoint {entry.id} is sealed and this node has no store key")
        return self.keys.opener(entry.manifest.seal, entry.id)

    def writing(self) -> Codec:
        """How the chunks of a checkpoint written now are named and stored."""
        return self._codec(self.keys.active if self.keys is not None else "")

    def reading(self, entry: Entry) -> Codec:
        """How the chunks of `entry` are checked and opened; raises when this node cannot."""
        if entry.manifest is None:
            raise IntegrityError(f"checkpoint {entry.id} has no usable manifest")
        opener = self.opener(entry)
        codec = self._codec(opener.key_name if opener is not None else "")
        if codec.space != entry.manifest.space:
            raise IntegrityError(f"checkpoint {entry.id}: its chunks are not where its key keeps them")
        return codec

    def _codec(self, key_name: str) -> Codec:
        codec = self._codecs.get(key_name)
        if codec is None:
            keys = self.keys.chunk_keys(key_name) if self.keys is not None and key_name else None
            codec = self._codecs[key_name] = Codec(keys)
        return codec

    def authenticate(self, manifest: Manifest, text: bytes, cid: str) -> None:
        """Raise unless the manifest is usable here: sealed and authentic with a key, or
        unsealed without one. A key this node lacks is not proof of corruption."""
        if self.keys is None:
            if manifest.seal:
                raise UnsupportedManifestError("sealed with a store key this node does not have")
            return
        if not manifest.seal:
            raise ManifestError("not sealed with the store key; never restored")
        try:
            opener = self.keys.opener(manifest.seal, cid)
        except SealError as exc:
            raise UnsupportedManifestError(str(exc)) from None
        try:
            opener.verify(seal.canonical(json.loads(text)), manifest.seal.get("mac", ""))
        except SealError as exc:
            raise ManifestError(str(exc)) from None

    def sign(self, manifest: Manifest, signer: Sealer | Opener | None) -> bytes:
        """The manifest's bytes, with its MAC when there is a key."""
        if signer is None:
            manifest.seal = {}
            return manifest.to_json().encode()
        if isinstance(signer, Sealer):
            manifest.seal = signer.seal_info()
        manifest.seal["mac"] = ""
        manifest.seal["mac"] = signer.sign(seal.canonical(json.loads(manifest.to_json())))
        return manifest.to_json().encode()
