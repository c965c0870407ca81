#!/usr/bin/env python3
"""Build the container images of the end-to-end tests, offline.

Writes one OCI image-layout archive (index.json, oci-layout, blobs/sha256/...)
holding two linux/amd64 images that share a single uncompressed layer made
from a static busybox (Debian's busybox-static, /bin/busybox):

  hotrestart.test/busybox:latest  Cmd ["sh"], no Entrypoint
  hotrestart.test/pause:latest    the pod sandbox ("pause") image: a shell
                                  that exits at once on SIGTERM/SIGINT and
                                  otherwise waits forever

The layer has /bin/busybox, a /bin/<applet> symlink for every applet the
binary lists, sbin -> bin, usr/bin -> ../bin, usr/sbin -> ../bin, a minimal
/etc (passwd, group) and the usual empty directories.  Output is
byte-for-byte deterministic for a given busybox binary (fixed mtimes and
owners, sorted entries).

Import into containerd (2.x and 1.7 alike):

  ctr -a SOCKET -n k8s.io images import --local OUTPUT.tar

Usage: build-test-image.py [--busybox /bin/busybox] OUTPUT.tar
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

BUSYBOX_IMAGE = "hotrestart.test/busybox:latest"
PAUSE_IMAGE = "hotrestart.test/pause:latest"

# PID 1 of a pid namespace ignores signals it has no handler for, so a bare
# `sleep` would only ever die of SIGKILL.  The trap makes SIGTERM/SIGINT end
# it at once: `wait` returns as soon as a trapped signal arrives.
PAUSE_CMD = ["sh", "-c", "trap 'exit 0' TERM INT; sleep 2147483647 & wait"]

DEFAULT_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
MTIME = 0

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar"


@dataclass(frozen=True)
class ImageSpec:
    name: str
    cmd: list[str]
    entrypoint: list[str] | None = None


IMAGES = (
    ImageSpec(BUSYBOX_IMAGE, ["sh"]),
    ImageSpec(PAUSE_IMAGE, PAUSE_CMD),
)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _info(name: str, kind: bytes, mode: int, size: int = 0, link: str = "") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.size = size
    ti.linkname = link
    ti.mtime = MTIME
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def _tar(entries: Iterable[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for ti, data in entries:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def applets(busybox: Path) -> list[str]:
    out = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True)
    names = {a.strip() for a in out.stdout.split() if a.strip()}
    names.discard("busybox")
    bad = [n for n in names if "/" in n or n in (".", "..")]
    if bad:
        raise ValueError(f"odd applet names from {busybox}: {bad}")
    return sorted(names)


def layer_tar(busybox: Path) -> bytes:
    binary = busybox.read_bytes()
    dirs = {
        "bin": 0o755,
        "dev": 0o755,
        "etc": 0o755,
        "home": 0o755,
        "proc": 0o555,
        "root": 0o700,
        "run": 0o755,
        "sys": 0o555,
        "tmp": 0o1777,
        "usr": 0o755,
        "var": 0o755,
        "var/tmp": 0o1777,
        "www": 0o755,
    }
    files = {
        "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        "etc/group": b"root:x:0:\nnogroup:x:65534:\n",
        "www/index.html": b"hotrestart test image\n",
    }
    links = {"sbin": "bin", "usr/bin": "../bin", "usr/sbin": "../bin"}
    links.update({f"bin/{a}": "busybox" for a in applets(busybox)})

    entries: list[tuple[str, tarfile.TarInfo, bytes | None]] = []
    for d, mode in dirs.items():
        entries.append((d, _info(d + "/", tarfile.DIRTYPE, mode), None))
    for f, data in files.items():
        entries.append((f, _info(f, tarfile.REGTYPE, 0o644, len(data)), data))
    entries.append(("bin/busybox", _info("bin/busybox", tarfile.REGTYPE, 0o755, len(binary)), binary))
    for name, target in links.items():
        entries.append((name, _info(name, tarfile.SYMTYPE, 0o777, link=target), None))
    entries.sort(key=lambda e: e[0])
    return _tar((ti, data) for _, ti, data in entries)


def build(output: Path, busybox: Path = Path("/bin/busybox")) -> dict[str, str]:
    """Write the OCI archive; return {image name: manifest digest}."""
    blobs: dict[str, bytes] = {}

    def blob(data: bytes) -> tuple[str, int]:
        d = _digest(data)
        blobs[d] = data
        return d, len(data)

    layer = layer_tar(busybox)
    layer_digest, layer_size = blob(layer)
    manifests = []
    result = {}
    for spec in IMAGES:
        cfg: dict[str, object] = {"Env": DEFAULT_ENV, "Cmd": spec.cmd, "WorkingDir": "/"}
        if spec.entrypoint is not None:
            cfg["Entrypoint"] = spec.entrypoint
        config = {
            "architecture": "amd64",
            "os": "linux",
            "created": "1970-01-01T00:00:00Z",
            "config": cfg,
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
            "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "hack/build-test-image.py"}],
        }
        config_digest, config_size = blob(_json(config))
        manifest = {
            "schemaVersion": 2,
            "mediaType": MT_MANIFEST,
            "config": {"mediaType": MT_CONFIG, "digest": config_digest, "size": config_size},
            "layers": [{"mediaType": MT_LAYER, "digest": layer_digest, "size": layer_size}],
        }
        m_digest, m_size = blob(_json(manifest))
        manifests.append(
            {
                "mediaType": MT_MANIFEST,
                "digest": m_digest,
                "size": m_size,
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {
                    "io.containerd.image.name": spec.name,
                    "org.opencontainers.image.ref.name": spec.name.rsplit(":", 1)[1],
                },
            }
        )
        result[spec.name] = m_digest
    index = {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": manifests}

    entries: list[tuple[tarfile.TarInfo, bytes | None]] = []
    entries.append((_info("blobs/", tarfile.DIRTYPE, 0o755), None))
    entries.append((_info("blobs/sha256/", tarfile.DIRTYPE, 0o755), None))
    for d in sorted(blobs):
        data = blobs[d]
        name = "blobs/sha256/" + d.split(":", 1)[1]
        entries.append((_info(name, tarfile.REGTYPE, 0o644, len(data)), data))
    for name, data in (
        ("index.json", _json(index)),
        ("oci-layout", _json({"imageLayoutVersion": "1.0.0"})),
    ):
        entries.append((_info(name, tarfile.REGTYPE, 0o644, len(data)), data))
    archive = _tar(entries)

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    tmp.write_bytes(archive)
    os.replace(tmp, output)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output", type=Path, help="OCI archive to write")
    ap.add_argument("--busybox", type=Path, default=Path("/bin/busybox"))
    args = ap.parse_args()
    for name, digest in build(args.output, args.busybox).items():
        print(f"{name} {digest}")


if __name__ == "__main__":
    main()
