"""Mounting the rootfs containerd hands to Create, and unmounting it on delete."""

from __future__ import annotations

import ctypes
import dataclasses
import os

from hotrestart.errors import InvalidArgumentError

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_MANDLOCK = 0x40
MS_DIRSYNC = 0x80
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MNT_DETACH = 2
EINVAL = 22
ENOENT = 2

# option -> (clear?, flags)
_FLAGS: dict[str, tuple[bool, int]] = {
    "ro": (False, MS_RDONLY),
    "rw": (True, MS_RDONLY),
    "nosuid": (False, MS_NOSUID),
    "suid": (True, MS_NOSUID),
    "nodev": (False, MS_NODEV),
    "dev": (True, MS_NODEV),
    "noexec": (False, MS_NOEXEC),
    "exec": (True, MS_NOEXEC),
    "sync": (False, MS_SYNCHRONOUS),
    "async": (True, MS_SYNCHRONOUS),
    "remount": (False, MS_REMOUNT),
    "mand": (False, MS_MANDLOCK),
    "nomand": (True, MS_MANDLOCK),
    "dirsync": (False, MS_DIRSYNC),
    "noatime": (False, MS_NOATIME),
    "atime": (True, MS_NOATIME),
    "nodiratime": (False, MS_NODIRATIME),
    "diratime": (True, MS_NODIRATIME),
    "bind": (False, MS_BIND),
    "rbind": (False, MS_BIND | MS_REC),
    "relatime": (False, MS_RELATIME),
    "norelatime": (True, MS_RELATIME),
    "strictatime": (False, MS_STRICTATIME),
    "defaults": (False, 0),
}
_PROPAGATION = {
    "private": MS_PRIVATE,
    "rprivate": MS_PRIVATE | MS_REC,
    "slave": MS_SLAVE,
    "rslave": MS_SLAVE | MS_REC,
    "shared": MS_SHARED,
    "rshared": MS_SHARED | MS_REC,
}


@dataclasses.dataclass(frozen=True, slots=True)
class Mount:
    type: str
    source: str
    options: tuple[str, ...] = ()


def parse_options(options: tuple[str, ...]) -> tuple[int, int, str]:
    """(flags, propagation flags, data string) as mount(2) wants them."""
    flags = 0
    propagation = 0
    data: list[str] = []
    for opt in options:
        if opt in _FLAGS:
            clear, bit = _FLAGS[opt]
            flags = flags & ~bit if clear else flags | bit
        elif opt in _PROPAGATION:
            propagation |= _PROPAGATION[opt]
        else:
            data.append(opt)
    return flags, propagation, ",".join(data)


def _mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    if (
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            flags,
            data.encode() if data else None,
        )
        != 0
    ):
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype or 'bind'} {source} on {target}: {os.strerror(err)}")


def mount(m: Mount, target: str) -> None:
    flags, propagation, data = parse_options(m.options)
    if len(data) >= 4096:
        raise InvalidArgumentError(f"mount options too long ({len(data)} bytes) for {m.type} mount")
    _mount(m.source, target, m.type, flags, data)
    if flags & MS_BIND and flags & MS_RDONLY:
        # A bind mount ignores MS_RDONLY until remounted.
        _mount("", target, "", flags | MS_REMOUNT, "")
    if propagation:
        _mount("", target, "", propagation, "")


def mount_all(mounts: list[Mount], target: str) -> None:
    done = 0
    try:
        for m in mounts:
            mount(m, target)
            done += 1
    except BaseException:
        if done:
            unmount_all(target)
        raise


def unmount_all(target: str) -> None:
    """Unmount everything stacked on `target` (idempotent)."""
    path = target.encode()
    while True:
        if _libc.umount2(path, 0) == 0:
            continue
        err = ctypes.get_errno()
        if err in (EINVAL, ENOENT):
            return
        if _libc.umount2(path, MNT_DETACH) != 0:
            err = ctypes.get_errno()
            if err in (EINVAL, ENOENT):
                return
            raise OSError(err, f"umount {target}: {os.strerror(err)}")
