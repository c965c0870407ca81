"""Capture: a container's tree written as a tar, walked by descriptor and never followed."""

from __future__ import annotations

import contextlib
import io
import os
import stat
import tarfile
from typing import IO, Any

from hotrestart.checkpoint.rootfs.bounds import DIR_FLAGS, MAX_DEPTH, MAX_ENTRIES, open_dir
from hotrestart.checkpoint.rootfs.changes import Changes
from hotrestart.errors import FilesError

OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")


def _is_opaque(fd: int) -> bool:
    for name in OPAQUE_XATTRS:
        with contextlib.suppress(OSError):
            if os.getxattr(fd, name) == b"y":
                return True
    return False


class _Exactly(io.RawIOBase):
    """A file's bytes cut or zero-padded to the size its header announced (a running
    container may grow or shrink the file while it is read)."""

    def __init__(self, fd: int, size: int) -> None:
        self._fd = fd
        self._left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), self._left)
        if want == 0:
            return 0
        data = os.read(self._fd, want)
        if not data:  # shrunk: pad
            data = bytes(want)
        n = len(data)
        buffer[:n] = data
        self._left -= n
        return n


def _info(rel: str, st: os.stat_result, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(rel)
    info.type = kind
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid = st.st_uid, st.st_gid
    info.uname = info.gname = ""  # numeric owners only
    info.mtime = st.st_mtime
    return info


def capture(source: str, out: IO[bytes], *, overlay: bool) -> Changes:
    """Write the tree at `source` as a tar to `out`; with `overlay`, whiteouts and opaque
    directories are listed in the result instead of stored."""
    changes = Changes()
    root = open_dir(source)
    count = 0
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        stack: list[tuple[int, str, int]] = [(root, "", 0)]
        try:
            while stack:
                dirfd, rel_dir, depth = stack.pop()
                try:
                    names = sorted(os.listdir(dirfd))
                except OSError as exc:
                    changes.skipped.append(f"{rel_dir or '.'}: {exc.strerror}")
                    names = []
                subdirs: list[tuple[int, str, int]] = []
                try:
                    for name in names:
                        count += 1
                        if count > MAX_ENTRIES:
                            raise FilesError(f"more than {MAX_ENTRIES} entries under {source}")
                        rel = f"{rel_dir}/{name}" if rel_dir else name
                        sub = _capture_entry(tar, dirfd, name, rel, depth, overlay, changes)
                        if sub is not None:
                            subdirs.append((sub, rel, depth + 1))
                finally:
                    if dirfd != root:
                        os.close(dirfd)
                # Reversed onto the stack, so directories come out in name order.
                stack.extend(reversed(subdirs))
        finally:
            for fd, _, _ in stack:
                os.close(fd)
            os.close(root)
    return changes


def _capture_entry(
    tar: tarfile.TarFile, dirfd: int, name: str, rel: str, depth: int, overlay: bool, changes: Changes
) -> int | None:
    """Store one entry; a directory's descriptor is returned for the walk to descend into."""
    try:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return None  # removed while we walk
    mode = st.st_mode
    if stat.S_ISCHR(mode) and st.st_rdev == 0:
        if overlay:
            changes.whiteouts.append(rel)
        else:
            changes.skipped.append(f"{rel}: device")
        return None
    if stat.S_ISDIR(mode):
        if depth + 1 > MAX_DEPTH:
            raise FilesError(f"directories nested deeper than {MAX_DEPTH} levels at {rel}")
        try:
            fd = os.open(name, DIR_FLAGS, dir_fd=dirfd)
        except OSError as exc:  # swapped for a link or a file, or gone: not followed
            changes.skipped.append(f"{rel}: {exc.strerror}")
            return None
        try:
            st = os.fstat(fd)
            if overlay and _is_opaque(fd):
                changes.opaque.append(rel)
            tar.addfile(_info(rel, st, tarfile.DIRTYPE))
        except BaseException:
            os.close(fd)
            raise
        return fd
    if stat.S_ISREG(mode):
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dirfd)
        except OSError as exc:
            changes.skipped.append(f"{rel}: {exc.strerror}")
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):  # swapped for a FIFO or device between stat and open
                changes.skipped.append(f"{rel}: not a regular file")
                return None
            info = _info(rel, st, tarfile.REGTYPE)
            info.size = st.st_size
            tar.addfile(info, _Exactly(fd, st.st_size))
        finally:
            os.close(fd)
        return None
    if stat.S_ISLNK(mode):
        try:
            target = os.readlink(name, dir_fd=dirfd)
        except OSError as exc:
            changes.skipped.append(f"{rel}: {exc.strerror}")
            return None
        info = _info(rel, st, tarfile.SYMTYPE)
        info.linkname = target
        tar.addfile(info)
        return None
    if stat.S_ISFIFO(mode):
        tar.addfile(_info(rel, st, tarfile.FIFOTYPE))
        return None
    changes.skipped.append(f"{rel}: {'socket' if stat.S_ISSOCK(mode) else 'device'}")
    return None
