"""The versioned JSON manifest that describes one checkpoint.

The manifest is the only thing trusted about a checkpoint before it is verified: every
file it lists carries a sha256 of each of its stored (compressed) chunks, checked while it
is decompressed, so a flipped byte anywhere means a cold start, never a restore. A file's
own sha256 is the digest of its chunks' digests: one serial hash over gigabytes would
cost more than compressing them on a many-core node.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

SCHEMA = "hotrestart.io/checkpoint/v1"


class ManifestError(ValueError):
    """The manifest is missing, malformed, or of a schema this version cannot read."""


@dataclasses.dataclass
class Chunk:
    """One independent zstd frame of a stored file (restores decompress chunks in parallel)."""

    stored: int
    raw: int
    sha256: str


@dataclasses.dataclass
class FileEntry:
    path: str  # relative to the checkpoint folder
    sha256: str  # of the chunks' sha256 digests (32 bytes each, in order): see chunk_root
    stored_bytes: int
    raw_bytes: int
    chunks: list[Chunk] = dataclasses.field(default_factory=list)


def chunk_root(chunks: list[Chunk]) -> str:
    """A file's digest: sha256 over its chunks' binary sha256 digests, in order."""
    root = hashlib.sha256()
    for c in chunks:
        root.update(bytes.fromhex(c.sha256))
    return root.hexdigest()


@dataclasses.dataclass
class Identity:
    namespace: str
    pod: str
    container: str
    key: str = ""  # set by the hotrestart.io/identity annotation; overrides the three above

    def canonical(self) -> str:
        return self.key or f"{self.namespace}/{self.pod}/{self.container}"


@dataclasses.dataclass
class Manifest:
    id: str
    identity: Identity
    created_at: float
    node: str
    reason: str  # "stop" (checkpoint on stop) or "api", "periodic"
    image: str
    spec_digest: str
    runtime: dict[str, str]  # runc, criu, kernel versions and architecture
    network: dict[str, Any]  # addresses of the pod network namespace at checkpoint time
    files: list[FileEntry]
    timings: dict[str, float]  # seconds per phase
    restore_attempts: int = 0
    tcp: str = "close"
    gpu: dict[str, Any] = dataclasses.field(default_factory=dict)  # devices and processes; see gpu/plan.py
    schema: str = SCHEMA

    @property
    def stored_bytes(self) -> int:
        return sum(f.stored_bytes for f in self.files)

    @property
    def raw_bytes(self) -> int:
        return sum(f.raw_bytes for f in self.files)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ManifestError(f"manifest is not JSON: {exc}") from exc
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise ManifestError(f"unknown manifest schema {data.get('schema') if isinstance(data, dict) else None!r}")
        try:
            data["identity"] = Identity(**data["identity"])
            files = []
            for f in data["files"]:
                f["chunks"] = [Chunk(**c) for c in f.get("chunks") or []]
                files.append(FileEntry(**f))
            data["files"] = files
            manifest = cls(**data)
        except (KeyError, TypeError) as exc:
            raise ManifestError(f"manifest is incomplete: {exc}") from exc
        for entry in manifest.files:
            if entry.path.startswith("/") or ".." in entry.path.split("/"):
                raise ManifestError(f"manifest names a file outside the checkpoint: {entry.path!r}")
            if entry.chunks and (
                sum(c.stored for c in entry.chunks) != entry.stored_bytes
                or sum(c.raw for c in entry.chunks) != entry.raw_bytes
            ):
                raise ManifestError(f"{entry.path}: chunk sizes do not add up")
        return manifest
