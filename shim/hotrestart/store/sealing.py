"""What the store key means for stored checkpoints, whatever holds them.

With a key, only checkpoints whose manifest authenticates are usable, every manifest
written is signed, and every chunk is sealed and opened (seal.py); without one, sealed
checkpoints cannot be read here. A key this node lacks is not proof of corruption: such
a checkpoint is unsupported, not corrupt, and retention leaves it alone.
"""

from __future__ import annotations

import functools
import json

from hotrestart.store import seal
from hotrestart.store.archive import ChunkOpen
from hotrestart.store.entry import Entry
from hotrestart.store.manifest import Manifest, ManifestError, UnsupportedManifestError
from hotrestart.store.seal import KeyRing, Opener, Sealer, SealError


class Sealing:
    def __init__(self, keys: KeyRing | None) -> None:
        self.keys = keys

    def sealer(self, cid: str) -> Sealer | None:
        """What seals checkpoint `cid` being written, when the store has a key."""
        return self.keys.sealer(cid) if self.keys is not None else None

    def opener(self, entry: Entry) -> Opener | None:
        if entry.manifest is None or not entry.manifest.seal:
            return None
        if self.keys is None:
            raise SealError(f"checkpoint {entry.id} is sealed and this node has no store key")
        return self.keys.opener(entry.manifest.seal, entry.id)

    def unseal(self, entry: Entry, rel: str) -> ChunkOpen | None:
        """What opens the chunks of the file `rel` of `entry`; None for an unsealed checkpoint."""
        opener = self.opener(entry)
        if opener is None:
            return None
        assert entry.manifest is not None
        index = next(i for i, f in enumerate(entry.manifest.files) if f.path == rel)
        return functools.partial(opener.open_chunk_into, index)

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
