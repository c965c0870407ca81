"""Whether a store can be reached by other machines, and so needs a store key.

Without a key, anyone who can write a shared store could have a node restore a process
image of their making; a node-local store is as safe as the node's own disk. The type of
the filesystem holding the store decides, from the mount table.
"""

from __future__ import annotations

import os
import re

from hotrestart.store.seal import KeyRing, SealError

# Filesystems known to live on this node alone. Any other type (nfs, cifs, ceph, fuse.*,
# 9p, virtiofs, lustre, ...) could be read or written by another machine, and so is not
# node-local: an unknown type needs a key too, rather than trusting a guess.
LOCAL_FILESYSTEMS = frozenset(
    {
        "ext2",
        "ext3",
        "ext4",
        "xfs",
        "btrfs",
        "zfs",
        "f2fs",
        "bcachefs",
        "jfs",
        "reiserfs",
        "nilfs2",
        "tmpfs",
        "ramfs",
        "overlay",
        "vfat",
        "exfat",
    }
)


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash in paths as \ooo octal.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def filesystem_type(path: str, *, mountinfo: str = "/proc/self/mountinfo") -> str:
    """The type of the filesystem holding `path` (which need not exist yet)."""
    real = os.path.realpath(path)
    best: tuple[int, str] | None = None
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise SealError(f"cannot tell which filesystem holds {path}: {exc}") from exc
    for line in lines:
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)  # after the optional fields
            point, fstype = _unescape(fields[4]), fields[sep + 1]
        except (ValueError, IndexError):
            continue
        if real == point or real.startswith(point.rstrip("/") + "/"):
            # Longest mount point wins; of equal ones the later, mounted on top.
            if best is None or len(point) >= best[0]:
                best = (len(point), fstype)
    if best is None:
        raise SealError(f"cannot tell which filesystem holds {path}: no mount in {mountinfo}")
    return best[1]


def node_local(store_root: str, *, mountinfo: str = "/proc/self/mountinfo") -> bool:
    """Whether only this node can reach the store: not a URL, and on a local filesystem."""
    if "://" in store_root:
        return False
    return filesystem_type(store_root, mountinfo=mountinfo) in LOCAL_FILESYSTEMS


def require_key(
    store_root: str,
    ring: KeyRing | None,
    allow_unauthenticated: bool,
    *,
    mountinfo: str = "/proc/self/mountinfo",
) -> None:
    """Refuse a store that other machines can write unless checkpoints are sealed.

    Without a key, anyone who can write a shared store could have a node restore a process
    image of their making; a node-local store is as safe as the node's own disk."""
    if ring is not None or allow_unauthenticated:
        return
    if "://" in store_root:
        kind = "an object store"
    else:
        fstype = filesystem_type(store_root, mountinfo=mountinfo)
        if fstype in LOCAL_FILESYSTEMS:
            return
        kind = f"on {fstype}, not a filesystem of this node alone"
    raise SealError(
        f"checkpoint store {store_root} is {kind}: it needs a store key, "
        "or unauthenticated checkpoints allowed explicitly"
    )
