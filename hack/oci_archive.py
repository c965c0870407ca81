"""OCI image-layout archives, written deterministically and offline.

An archive holds index.json, oci-layout and blobs/sha256/...: what `ctr images import` (and
`docker load`, `podman load`) take. Used by the test images (build-test-image.py) and the
installer image (build-installer-image.py). The same layers and configs give the same bytes:
fixed dates and owners, sorted entries, canonical JSON.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

MTIME = 0
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar"


@dataclass(frozen=True)
class Image:
    name: str  # a full reference, e.g. docker.io/hotrestart/installer:0.1.0
    config: dict[str, object]  # the image config's "config" (Env, Cmd, Entrypoint, ...)
    layers: tuple[bytes, ...]  # uncompressed layer tars, bottom first
    created_by: str


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def info(name: str, kind: bytes, mode: int, size: int = 0, link: str = "", mtime: int = MTIME) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.size = size
    ti.linkname = link
    ti.mtime = mtime
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def tar_bytes(entries: Iterable[tuple[tarfile.TarInfo, bytes | None]], fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for ti, data in entries:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def write(output: Path, images: Iterable[Image]) -> dict[str, str]:
    """Write the archive; return {image name: manifest digest}."""
    blobs: dict[str, bytes] = {}

    def blob(data: bytes) -> tuple[str, int]:
        d = digest(data)
        blobs[d] = data
        return d, len(data)

    manifests = []
    result = {}
    for image in images:
        layers = [blob(layer) for layer in image.layers]
        config = {
            "architecture": "amd64",
            "os": "linux",
            "created": "1970-01-01T00:00:00Z",
            "config": image.config,
            "rootfs": {"type": "layers", "diff_ids": [d for d, _ in layers]},
            "history": [{"created": "1970-01-01T00:00:00Z", "created_by": image.created_by}],
        }
        config_digest, config_size = blob(canonical_json(config))
        manifest = {
            "schemaVersion": 2,
            "mediaType": MT_MANIFEST,
            "config": {"mediaType": MT_CONFIG, "digest": config_digest, "size": config_size},
            "layers": [{"mediaType": MT_LAYER, "digest": d, "size": size} for d, size in layers],
        }
        m_digest, m_size = blob(canonical_json(manifest))
        manifests.append(
            {
                "mediaType": MT_MANIFEST,
                "digest": m_digest,
                "size": m_size,
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {
                    "io.containerd.image.name": image.name,
                    "org.opencontainers.image.ref.name": image.name.rsplit(":", 1)[1],
                },
            }
        )
        result[image.name] = m_digest
    index = {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": manifests}

    entries: list[tuple[tarfile.TarInfo, bytes | None]] = [
        (info("blobs/", tarfile.DIRTYPE, 0o755), None),
        (info("blobs/sha256/", tarfile.DIRTYPE, 0o755), None),
    ]
    for d in sorted(blobs):
        data = blobs[d]
        entries.append((info("blobs/sha256/" + d.split(":", 1)[1], tarfile.REGTYPE, 0o644, len(data)), data))
    for name, data in (
        ("index.json", canonical_json(index)),
        ("oci-layout", canonical_json({"imageLayoutVersion": "1.0.0"})),
    ):
        entries.append((info(name, tarfile.REGTYPE, 0o644, len(data)), data))

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            for ti, data in entries:
                tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    os.replace(tmp, output)
    return result
