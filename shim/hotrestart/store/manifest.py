"""The versioned JSON manifest that describes one checkpoint.

The manifest is the only thing trusted about a checkpoint before it is verified: every
file it lists is a sequence of content-addressed chunks (`chunkcodec`), each named by the
BLAKE3 digest of its raw bytes and checked against it when read back, so a flipped byte
anywhere means a cold start, never a restore. A file's own digest is the digest of its
chunks' digests: one serial hash over gigabytes would cost more than the chunks' own.

A manifest is read from a store that other nodes write, by a root process, so `from_json`
takes nothing on faith: every field is checked against a table of validators (type, range,
length, pattern) and anything else is a `ManifestError` naming the field. A manifest of a
schema or with fields this version does not know is an `UnsupportedManifestError`: written
by a newer node, not restorable here, and not corrupt either (retention leaves it alone).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import blake3

from hotrestart.errors import StoreError

SCHEMA = "hotrestart.io/checkpoint/v2"
KNOWN_SCHEMAS = frozenset({SCHEMA})
# Written by an earlier version (files stored whole in the checkpoint, not as shared
# chunks): never restored here, and removed by retention like a corrupt entry.
OLDER_SCHEMAS = frozenset({"hotrestart.io/checkpoint/v1"})
_SCHEMA_FAMILY = re.compile(r"hotrestart\.io/checkpoint/v[0-9]{1,6}")

MAX_MANIFEST = 16 << 20  # bytes; about 100,000 chunks, so some 200-400 GiB of memory
MAX_CHUNK_RAW = 64 << 20  # chunks are written at 2-4 MiB (other files' at 4 MiB); a larger one is refused
# zstd's compress bound of the largest chunk: no honest frame of it is larger.
MAX_CHUNK_STORED = MAX_CHUNK_RAW + (MAX_CHUNK_RAW >> 8) + 4096
MAX_FILE_BYTES = 1 << 50
MAX_FILES = 65536
MAX_FUTURE = 86400.0  # a checkpoint taken more than a day "from now" is not believed
_MAX_TEXT = 4096
_MAX_KEYS = 256
_MAX_DEPTH = 8

_DIGEST = re.compile(r"[0-9a-f]{64}")
_SPACE = re.compile(r"plain|k-[0-9a-f]{24}")
CHECKPOINT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# A stored file's path: relative, plain names only (no "..", no empty or hidden parts).
_PATH_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+=,@:-]{0,254}")
_MAX_PATH_DEPTH = 8
_K8S_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class ManifestError(StoreError, ValueError):
    """The manifest is missing, malformed, or of a schema this version cannot read.

    Also a ValueError, as it was before the store's errors had a common root: callers
    outside the store still catch it as one."""


class UnsupportedManifestError(ManifestError):
    """A well-formed manifest of a newer schema (or with fields this version does not know)."""


@dataclasses.dataclass
class Chunk:
    """One piece of a stored file, kept in the store's chunks under its digest (restores
    read and decompress chunks in parallel)."""

    stored: int
    raw: int
    digest: str


@dataclasses.dataclass
class FileEntry:
    path: str  # relative to the checkpoint
    digest: str  # of the chunks' digests (32 bytes each, in order): see chunk_root
    stored_bytes: int
    raw_bytes: int
    chunks: list[Chunk] = dataclasses.field(default_factory=list)


def chunk_root(chunks: list[Chunk]) -> str:
    """A file's digest: BLAKE3 over its chunks' binary digests, in order."""
    root = blake3.blake3()
    for c in chunks:
        root.update(bytes.fromhex(c.digest))
    return root.hexdigest()


@dataclasses.dataclass
class Identity:
    namespace: str
    pod: str
    container: str
    key: str = ""  # the annotation's key, or the workload's (Job, pod template); replaces pod and container
    pool: bool = False  # several checkpoints kept, one per stopped member (a ReplicaSet's replicas)
    source: str = ""  # how the identity was chosen, for people reading `hotrestart ls`

    def canonical(self) -> str:
        """The identity as one string, always within its namespace, and injective.

        `ns/pod/container` (names as Kubernetes allows them) or `ns//key`; anything else
        (an empty or odd name) is the JSON of all four fields, which starts with `[`, a
        character neither readable form can start with. A key never reaches another
        namespace's checkpoints: the namespace is part of every form."""
        if _K8S_NAME.fullmatch(self.namespace):
            if self.key:
                return f"{self.namespace}//{self.key}"
            if _K8S_NAME.fullmatch(self.pod) and _K8S_NAME.fullmatch(self.container):
                return f"{self.namespace}/{self.pod}/{self.container}"
        return json.dumps([self.namespace, self.pod, self.container, self.key])

    def same(self, other: Identity) -> bool:
        """Both name the same checkpoints: equal namespaces and keys, and with no key equal
        pods and containers (a key replaces them, so a renamed pod keeps its checkpoint)."""
        if (self.namespace, self.key) != (other.namespace, other.key):
            return False
        return bool(self.key) or (self.pod, self.container) == (other.pod, other.container)


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
    space: str = "plain"  # where its chunks are: `plain`, or the store key's (chunkcodec)
    restore_attempts: int = 0
    tcp: str = "close"
    gpu: dict[str, Any] = dataclasses.field(default_factory=dict)  # devices and processes; see gpu/plan.py
    schema: str = SCHEMA
    new_bytes: int = 0  # stored bytes of the chunks this checkpoint added; the rest it shares
    # With a store key: key name, salt, algorithm and the MAC over the rest (see seal.py).
    seal: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def stored_bytes(self) -> int:
        return sum(f.stored_bytes for f in self.files)

    @property
    def raw_bytes(self) -> int:
        return sum(f.raw_bytes for f in self.files)

    def to_json(self) -> str:
        text = json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"
        if len(text) > MAX_MANIFEST:
            # Refused when written, not only when read: published, it would only start cold.
            raise ManifestError(f"manifest is larger than {MAX_MANIFEST} bytes ({len(self.files)} files)")
        return text

    @classmethod
    def from_json(cls, text: str | bytes, *, now: float | None = None) -> Manifest:
        if len(text) > MAX_MANIFEST:
            raise ManifestError(f"manifest is larger than {MAX_MANIFEST} bytes")
        try:
            data = json.loads(text, parse_constant=_no_constant)
        except ManifestError:
            raise
        except (ValueError, RecursionError) as exc:
            raise ManifestError(f"manifest is not JSON: {str(exc)[:200]}") from exc
        if not isinstance(data, dict):
            raise ManifestError("manifest is not a JSON object")
        schema = data.get("schema")
        if not isinstance(schema, str) or len(schema) > 128:
            raise ManifestError("manifest has no schema")
        if schema not in KNOWN_SCHEMAS:
            if schema in OLDER_SCHEMAS:
                raise ManifestError(f"manifest schema {schema!r} was written by an earlier version; not restored")
            if _SCHEMA_FAMILY.fullmatch(schema):
                raise UnsupportedManifestError(f"manifest schema {schema!r} is newer than this version reads")
            raise ManifestError(f"unknown manifest schema {schema[:64]!r}")
        _known_fields("manifest", data, _FIELDS)
        values: dict[str, Any] = {}
        for name, (required, check) in _FIELDS.items():
            if name not in data:
                if required:
                    raise ManifestError(f"manifest is incomplete: no {name!r}")
                continue
            values[name] = check(name, data[name])
        manifest = cls(**values)
        when = now if now is not None else time.time()
        if manifest.created_at > when + MAX_FUTURE:
            raise ManifestError("created_at lies more than a day in the future")
        return manifest


# -- validators: each takes (where, value) and returns the checked, converted value ---------------

Check = Callable[[str, Any], Any]


def _no_constant(name: str) -> Any:
    raise ManifestError(f"manifest holds {name}, which is not JSON")


def _known_fields(where: str, data: Mapping[str, Any], table: Mapping[str, Any]) -> None:
    extra = sorted(k for k in data if k not in table)
    if extra:
        shown = ", ".join(repr(k[:32]) for k in extra[:4])
        raise UnsupportedManifestError(f"{where} has fields this version does not know: {shown}")


def _text(limit: int = _MAX_TEXT, pattern: re.Pattern[str] | None = None) -> Check:
    def check(where: str, value: Any) -> str:
        if not isinstance(value, str):
            raise ManifestError(f"{where} is not a string")
        if len(value) > limit:
            raise ManifestError(f"{where} is longer than {limit} characters")
        # Printed by `hotrestart ls`/`inspect` on an admin's terminal: no control characters.
        if _CONTROL.search(value):
            raise ManifestError(f"{where} holds control characters")
        if pattern is not None and not pattern.fullmatch(value):
            raise ManifestError(f"{where} is not of the expected form")
        return value

    return check


def _choice(*allowed: str) -> Check:
    def check(where: str, value: Any) -> str:
        if value not in allowed:
            raise ManifestError(f"{where} must be one of {', '.join(allowed)}")
        return str(value)

    return check


def _bool(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ManifestError(f"{where} is not true or false")
    return value


def _int(low: int, high: int) -> Check:
    def check(where: str, value: Any) -> int:
        # bool is an int in Python; true is not a count.
        if not isinstance(value, int) or isinstance(value, bool):
            raise ManifestError(f"{where} is not an integer")
        if not low <= value <= high:
            raise ManifestError(f"{where} is out of range ({low}..{high})")
        return value

    return check


def _float(low: float, high: float) -> Check:
    def check(where: str, value: Any) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ManifestError(f"{where} is not a number")
        result = float(value)
        if not math.isfinite(result) or not low <= result <= high:
            raise ManifestError(f"{where} is out of range")
        return result

    return check


def _dict_of(value_check: Check, key_limit: int = 128, entries: int = _MAX_KEYS) -> Check:
    key_check = _text(key_limit)

    def check(where: str, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise ManifestError(f"{where} is not an object")
        if len(value) > entries:
            raise ManifestError(f"{where} has more than {entries} entries")
        return {key_check(f"{where} key", k): value_check(f"{where}.{k[:32]}", v) for k, v in value.items()}

    return check


def _list_of(item_check: Check, limit: int) -> Check:
    def check(where: str, value: Any) -> list[Any]:
        if not isinstance(value, list):
            raise ManifestError(f"{where} is not a list")
        if len(value) > limit:
            raise ManifestError(f"{where} has more than {limit} items")
        return [item_check(f"{where}[{i}]", v) for i, v in enumerate(value)]

    return check


def _json(where: str, value: Any, depth: int = 0) -> Any:
    """Free-form data (recorded, shown, never acted on): plain JSON, bounded."""
    if depth > _MAX_DEPTH:
        raise ManifestError(f"{where} is nested too deeply")
    if isinstance(value, dict):
        return _dict_of(lambda w, v: _json(w, v, depth + 1))(where, value)
    if isinstance(value, list):
        return _list_of(lambda w, v: _json(w, v, depth + 1), 4096)(where, value)
    if isinstance(value, str):
        return _text()(where, value)
    if isinstance(value, float):
        return _float(-1e18, 1e18)(where, value)
    if value is None or isinstance(value, (bool, int)):
        return value
    raise ManifestError(f"{where} is not plain JSON")


def _record(table: Mapping[str, tuple[bool, Check]], build: Callable[..., Any], *, strict: bool = True) -> Check:
    """An object of known fields; with `strict`, an unknown field means a newer writer."""

    def check(where: str, value: Any) -> Any:
        if not isinstance(value, dict):
            raise ManifestError(f"{where} is not an object")
        if strict:
            _known_fields(where, value, table)
        fields: dict[str, Any] = {}
        for name, (required, field_check) in table.items():
            if name in value:
                fields[name] = field_check(f"{where}.{name}", value[name])
            elif required:
                raise ManifestError(f"{where} has no {name!r}")
        return build(**fields)

    return check


def _relative_path(where: str, value: Any) -> str:
    path: str = _text(1024)(where, value)
    parts = path.split("/")
    if len(parts) > _MAX_PATH_DEPTH or not all(_PATH_PART.fullmatch(p) for p in parts):
        raise ManifestError(f"manifest names a file outside the checkpoint or of an odd name: {path[:128]!r}")
    return path


def _file_entry(where: str, value: Any) -> FileEntry:
    entry: FileEntry = _record(_FILE_FIELDS, FileEntry)(where, value)
    if sum(c.stored for c in entry.chunks) != entry.stored_bytes or sum(c.raw for c in entry.chunks) != entry.raw_bytes:
        raise ManifestError(f"{entry.path}: chunk sizes do not add up")
    return entry


def _files(where: str, value: Any) -> list[FileEntry]:
    files: list[FileEntry] = _list_of(_file_entry, MAX_FILES)(where, value)
    # A restore writes each file to its path less ".zst": two entries must not meet there,
    # and no file may stand where another's folder is (in the store or in the work folder).
    for names in ([f.path for f in files], [f.path.removesuffix(".zst") for f in files]):
        if len(set(names)) != len(names):
            raise ManifestError("manifest lists a file twice")
        folders = {"/".join(n.split("/")[:i]) for n in names for i in range(1, n.count("/") + 1)}
        if folders.intersection(names):
            raise ManifestError("manifest names a file where another's folder is")
    return files


def _network(where: str, value: Any) -> dict[str, Any]:
    network: dict[str, Any] = _json(where, value)
    if not isinstance(network, dict):
        raise ManifestError(f"{where} is not an object")
    _list_of(_text(64), 1024)(f"{where}.addresses", network.get("addresses") or [])
    return network


def _gpu(where: str, value: Any) -> dict[str, Any]:
    gpu: dict[str, Any] = _json(where, value)
    if not isinstance(gpu, dict):
        raise ManifestError(f"{where} is not an object")
    _list_of(_record(_GPU_DEVICE, dict, strict=False), 1024)(f"{where}.devices", gpu.get("devices") or [])
    _list_of(_record(_GPU_PROCESS, dict, strict=False), 65536)(f"{where}.processes", gpu.get("processes") or [])
    for name in ("driver", "owner"):
        if name in gpu:
            _text(256)(f"{where}.{name}", gpu[name])
    return gpu


_CHUNK_FIELDS: dict[str, tuple[bool, Check]] = {
    "stored": (True, _int(1, MAX_CHUNK_STORED)),
    "raw": (True, _int(1, MAX_CHUNK_RAW)),
    "digest": (True, _text(64, _DIGEST)),
}
_FILE_FIELDS: dict[str, tuple[bool, Check]] = {
    "path": (True, _relative_path),
    "digest": (True, _text(64, _DIGEST)),
    "stored_bytes": (True, _int(0, MAX_FILE_BYTES)),
    "raw_bytes": (True, _int(0, MAX_FILE_BYTES)),
    "chunks": (False, _list_of(_record(_CHUNK_FIELDS, Chunk), MAX_FILE_BYTES // MAX_CHUNK_RAW)),
}
_IDENTITY_FIELDS: dict[str, tuple[bool, Check]] = {
    "namespace": (True, _text(253)),
    "pod": (True, _text(253)),
    "container": (True, _text(253)),
    "key": (False, _text(1024)),
    "pool": (False, _bool),
    "source": (False, _text(512)),
}
# GPU records are read by gpu/plan.py: the fields it reads must have the types it expects.
_GPU_DEVICE: dict[str, tuple[bool, Check]] = {
    "name": (True, _text(256)),
    "uuid": (True, _text(256)),
    "memory_used": (False, _int(0, 1 << 50)),
    "memory_total": (False, _int(0, 1 << 50)),
}
_GPU_PROCESS: dict[str, tuple[bool, Check]] = {
    "pid": (False, _int(0, 1 << 22)),
    "memory_used": (False, _int(0, 1 << 50)),
    "uuids": (False, _list_of(_text(256), 1024)),
}

# Every top-level field and its check: a new optional field is one more line here.
_FIELDS: dict[str, tuple[bool, Check]] = {
    "schema": (True, _text(128)),
    "id": (True, _text(128, CHECKPOINT_ID)),
    "identity": (True, _record(_IDENTITY_FIELDS, Identity)),
    "created_at": (True, _float(0.0, 1e11)),
    "node": (True, _text(253)),
    "reason": (True, _text(64)),
    "image": (True, _text()),
    "spec_digest": (True, _text(256)),
    "runtime": (True, _dict_of(_text(1024), entries=64)),
    "network": (True, _network),
    "files": (True, _files),
    "timings": (True, _dict_of(_float(0.0, 1e9), entries=64)),
    "restore_attempts": (False, _int(0, 1 << 20)),
    "tcp": (False, _choice("close", "keep")),
    "gpu": (False, _gpu),
    "seal": (False, _dict_of(_text(256), key_limit=16, entries=8)),
    "space": (True, _text(32, _SPACE)),
    "new_bytes": (False, _int(0, MAX_FILE_BYTES)),
}
