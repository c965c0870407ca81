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
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import oci_archive

BUSYBOX_IMAGE = "hotrestart.test/busybox:latest"
PAUSE_IMAGE = "hotrestart.test/pause:latest"

# PID 1 of a pid namespace ignores signals it has no handler for, so a bare
# `sleep` would only ever die of SIGKILL.  The trap makes SIGTERM/SIGINT end
# it at once: `wait` returns as soon as a trapped signal arrives.
PAUSE_CMD = ["sh", "-c", "trap 'exit 0' TERM INT; sleep 2147483647 & wait"]

DEFAULT_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]


@dataclass(frozen=True)
class ImageSpec:
    name: str
    cmd: list[str]
    entrypoint: list[str] | None = None


IMAGES = (
    ImageSpec(BUSYBOX_IMAGE, ["sh"]),
    ImageSpec(PAUSE_IMAGE, PAUSE_CMD),
)


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
        entries.append((d, oci_archive.info(d + "/", tarfile.DIRTYPE, mode), None))
    for f, data in files.items():
        entries.append((f, oci_archive.info(f, tarfile.REGTYPE, 0o644, len(data)), data))
    entries.append(("bin/busybox", oci_archive.info("bin/busybox", tarfile.REGTYPE, 0o755, len(binary)), binary))
    for name, target in links.items():
        entries.append((name, oci_archive.info(name, tarfile.SYMTYPE, 0o777, link=target), None))
    entries.sort(key=lambda e: e[0])
    return oci_archive.tar_bytes((ti, data) for _, ti, data in entries)


def build(output: Path, busybox: Path = Path("/bin/busybox")) -> dict[str, str]:
    """Write the OCI archive; return {image name: manifest digest}."""
    layer = layer_tar(busybox)
    images = []
    for spec in IMAGES:
        cfg: dict[str, object] = {"Env": DEFAULT_ENV, "Cmd": spec.cmd, "WorkingDir": "/"}
        if spec.entrypoint is not None:
            cfg["Entrypoint"] = spec.entrypoint
        images.append(oci_archive.Image(spec.name, cfg, (layer,), "hack/build-test-image.py"))
    return oci_archive.write(output, images)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output", type=Path, help="OCI archive to write")
    ap.add_argument("--busybox", type=Path, default=Path("/bin/busybox"))
    args = ap.parse_args()
    for name, digest in build(args.output, args.busybox).items():
        print(f"{name} {digest}")


if __name__ == "__main__":
    main()
