"""Which of a container's files travel with its checkpoint, and where they land again.

The root filesystem's changes (the overlay's upper layer) and the emptyDir volumes the pod
asks to carry are captured by `rootfs` beneath directory descriptors, never interpreted.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from typing import Any

from hotrestart.checkpoint import rootfs
from hotrestart.container.seam import View
from hotrestart.errors import FilesError
from hotrestart.store.manifest import Manifest

log = logging.getLogger(__name__)

RAW = "raw"  # a staging folder's uncompressed captures, removed before publishing
_EMPTY_DIR = "/volumes/kubernetes.io~empty-dir/"


class ReplayError(FilesError):
    """A checkpoint's files cannot be put back into the new container."""


def volume_sources(spec: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, str]:
    """emptyDir volume name -> host directory, for the named volumes mounted in `spec`."""
    found: dict[str, str] = {}
    for m in spec.get("mounts") or []:
        source = str(m.get("source") or "")
        if _EMPTY_DIR in source:
            name = source.split(_EMPTY_DIR, 1)[1].split("/", 1)[0]
            if name in names and os.path.isdir(source):
                found[name] = source
    return found


def capture(view: View, carry_volumes: tuple[str, ...], staging: str) -> list[tuple[str, str]]:
    """Capture the container's files into the store's own disk (never a memory-sized tmpfs:
    a small process may carry a large root filesystem). Returns (raw file, stored name)."""
    raw = os.path.join(staging, RAW)
    os.mkdir(raw, 0o700)
    files: list[tuple[str, str]] = []
    upper = view.upperdir
    if upper and os.path.isdir(upper):
        tar = os.path.join(raw, "rootfs-diff.tar")
        with open(tar, "wb", opener=_private) as f:
            changes = rootfs.capture(upper, f, overlay=True)
        changes_path = os.path.join(raw, "rootfs-diff.json")
        with open(changes_path, "w", opener=_private) as f:
            f.write(changes.to_json())
        files += [(tar, "rootfs-diff.tar.zst"), (changes_path, "rootfs-diff.json.zst")]
        if changes.skipped:
            log.info("%s: files not carried: %s", view.id, "; ".join(changes.skipped[:20]))
    for name, source in sorted(volume_sources(view.spec, carry_volumes).items()):
        tar = os.path.join(raw, f"volume-{name}.tar")
        with open(tar, "wb", opener=_private) as f:
            skipped = rootfs.capture(source, f, overlay=False).skipped
        files.append((tar, f"volumes/{name}.tar.zst"))
        if skipped:
            log.info("%s: files of volume %s not carried: %s", view.id, name, "; ".join(skipped[:20]))
    return files


async def replay(view: View, manifest: Manifest, work: str) -> None:
    """Put a checkpoint's files (unpacked into `work`) back into the new container."""
    names = {f.path for f in manifest.files}
    replays: list[tuple[str, str, str]] = []
    if "rootfs-diff.tar.zst" in names:
        changes = os.path.join(work, "rootfs-diff.json") if "rootfs-diff.json.zst" in names else ""
        replays.append((os.path.join(view.bundle, "rootfs"), os.path.join(work, "rootfs-diff.tar"), changes))
    carried = tuple(p.removeprefix("volumes/").removesuffix(".tar.zst") for p in names if p.startswith("volumes/"))
    targets = volume_sources(view.spec, carried)
    for name in sorted(carried):
        if name not in targets:
            raise ReplayError(f"volume {name} travelled with the checkpoint but the new pod does not mount it")
        replays.append((targets[name], os.path.join(work, "volumes", f"{name}.tar"), ""))
    await asyncio.to_thread(_replay, replays)


def _replay(replays: list[tuple[str, str, str]]) -> None:
    for target, tar, changes in replays:
        rootfs.apply(target, tar, rootfs.load_changes(changes) if changes else None)


def _private(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_CLOEXEC | os.O_EXCL, 0o600)
