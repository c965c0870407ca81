#!/usr/bin/env python3
"""Build the installer image (`make installer`): dist/hotrestart-installer-<version>.oci.tar.

One layer: the node bundle (dist/hotrestart-<version>-linux-amd64.tar.gz, from `make dist`)
at /hotrestart, and the empty directories a container runtime mounts over. The bundle carries
its own C library and Python, so the image needs no base image. The DaemonSet in
runtime-class/ runs `/hotrestart/bin/hotrestart install --wait` in it, privileged, with the
host's / at /host.

Built offline and deterministically from the bundle (see hack/oci_archive.py). Load it with
`ctr -n k8s.io images import dist/hotrestart-installer-<version>.oci.tar`, or push it with
any OCI tool (skopeo copy oci-archive:...).

Usage: build-installer-image.py [--bundle TARBALL] [--output TAR] [--name REF]
"""

from __future__ import annotations

import argparse
import re
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import oci_archive  # noqa: E402

REPOSITORY = "docker.io/hotrestart/installer"
MOUNT_POINT = "hotrestart"
DIRS = {"dev": 0o755, "etc": 0o755, "host": 0o755, "proc": 0o555, "sys": 0o555, "tmp": 0o1777, "var": 0o755}
FILES = {
    "etc/passwd": b"root:x:0:0:root:/root:/sbin/nologin\n",
    "etc/group": b"root:x:0:\n",
}


def version() -> str:
    match = re.search(r'__version__ = "([^"]+)"', (REPO / "shim" / "hotrestart" / "__init__.py").read_text())
    if not match:
        raise SystemExit("no __version__ in shim/hotrestart/__init__.py")
    return match.group(1)


def layer(bundle: Path) -> bytes:
    """The bundle re-rooted at /hotrestart, after the image's own directories and files."""
    entries: list[tuple[tarfile.TarInfo, bytes | None]] = []
    for name, mode in sorted(DIRS.items()):
        entries.append((oci_archive.info(name + "/", tarfile.DIRTYPE, mode), None))
    for name, data in sorted(FILES.items()):
        entries.append((oci_archive.info(name, tarfile.REGTYPE, 0o644, len(data)), data))
    with tarfile.open(bundle) as tar:
        members = tar.getmembers()
        top = members[0].name.split("/", 1)[0]
        for member in members:
            first, _, rest = member.name.partition("/")
            if first != top or member.isdev() or member.islnk():
                raise SystemExit(f"{bundle}: unexpected entry {member.name}")
            name = f"{MOUNT_POINT}/{rest}" if rest else MOUNT_POINT
            if member.isdir():
                entries.append((oci_archive.info(name + "/", tarfile.DIRTYPE, member.mode, mtime=member.mtime), None))
            elif member.issym():
                ti = oci_archive.info(name, tarfile.SYMTYPE, 0o777, link=member.linkname, mtime=member.mtime)
                entries.append((ti, None))
            else:
                f = tar.extractfile(member)
                assert f is not None
                data = f.read()
                ti = oci_archive.info(name, tarfile.REGTYPE, member.mode, len(data), mtime=member.mtime)
                entries.append((ti, data))
    # Long paths in the standard library need PAX headers (USTAR caps names at 255 bytes).
    return oci_archive.tar_bytes(entries, fmt=tarfile.PAX_FORMAT)


def main() -> None:
    ver = version()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=REPO / "dist" / f"hotrestart-{ver}-linux-amd64.tar.gz")
    ap.add_argument("--output", type=Path, default=REPO / "dist" / f"hotrestart-installer-{ver}.oci.tar")
    ap.add_argument("--name", default=f"{REPOSITORY}:{ver}")
    args = ap.parse_args()
    if not args.bundle.is_file():
        raise SystemExit(f"no bundle at {args.bundle} (run `make dist` first)")
    config: dict[str, object] = {
        "Env": [f"PATH=/{MOUNT_POINT}/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "Entrypoint": [f"/{MOUNT_POINT}/bin/hotrestart"],
        "Cmd": ["install", "--wait"],
        "WorkingDir": "/",
        "Labels": {
            "org.opencontainers.image.title": "hotrestart node installer",
            "org.opencontainers.image.version": ver,
            "org.opencontainers.image.licenses": "Apache-2.0",
        },
    }
    image = oci_archive.Image(args.name, config, (layer(args.bundle),), "hack/build-installer-image.py")
    for name, digest in oci_archive.write(args.output, [image]).items():
        print(f"{args.output}: {name} {digest}")


if __name__ == "__main__":
    main()
