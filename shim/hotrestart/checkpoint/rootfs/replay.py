"""Replay: a capture applied onto the new container's root, deletions first, then the tar."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tarfile
from collections.abc import Iterator
from typing import IO

from hotrestart.checkpoint.rootfs.bounds import DIR_FLAGS, MAX_DEPTH, MAX_ENTRIES, MAX_NAME, MAX_PATH, open_dir
from hotrestart.checkpoint.rootfs.changes import Changes
from hotrestart.errors import FilesError

_COPY = 1 << 20


def _components(rel: str) -> list[str]:
    """The path's components, or FilesError if it could name anything outside the tree."""
    if not rel or len(rel) > MAX_PATH or rel.startswith("/") or "\0" in rel:
        raise FilesError(f"unsafe path in saved files: {rel[:200]!r}")
    parts = [p for p in rel.split("/") if p]
    if not parts or len(parts) > MAX_DEPTH or any(p in (".", "..") or len(p) > MAX_NAME for p in parts):
        raise FilesError(f"unsafe path in saved files: {rel[:200]!r}")
    return parts


class _Tree:
    """The target tree, reached only through descriptors from its root."""

    def __init__(self, root: int) -> None:
        self.root = root
        self._dirs: dict[tuple[str, ...], int] = {}

    def parent(self, parts: list[str], *, create: bool) -> int | None:
        """A descriptor of the directory holding `parts[-1]`; None when it does not exist
        (and `create` is false). A symlink on the way is refused, never followed."""
        fd = self.root
        for i, part in enumerate(parts[:-1]):
            key = tuple(parts[: i + 1])
            cached = self._dirs.get(key)
            if cached is not None:
                fd = cached
                continue
            try:
                nxt = os.open(part, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    return None
                os.mkdir(part, 0o755, dir_fd=fd)
                nxt = os.open(part, DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    if not create:
                        return None
                    raise FilesError(f"{'/'.join(key)} is not a directory in the target") from None
                raise
            self._dirs[key] = nxt
            fd = nxt
        return fd

    def forget(self, parts: list[str]) -> None:
        """Drop cached descriptors at and below `parts` (it was removed or replaced)."""
        prefix = tuple(parts)
        for key in [k for k in self._dirs if k[: len(prefix)] == prefix]:
            os.close(self._dirs.pop(key))

    def close(self) -> None:
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()


def _lstat_at(dirfd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _remove_at(dirfd: int, name: str) -> None:
    st = _lstat_at(dirfd, name)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        # shutil.rmtree with dir_fd walks by descriptor and never follows links.
        shutil.rmtree(name, dir_fd=dirfd)
    else:
        os.unlink(name, dir_fd=dirfd)


def _clear_dir(dirfd: int, name: str) -> None:
    try:
        fd = os.open(name, DIR_FLAGS, dir_fd=dirfd)
    except OSError:
        return  # not a directory (any more): nothing to clear
    try:
        for child in os.listdir(fd):
            _remove_at(fd, child)
    finally:
        os.close(fd)


def _set_attrs_fd(fd: int, member: tarfile.TarInfo) -> None:
    os.fchown(fd, member.uid, member.gid)
    os.fchmod(fd, member.mode & 0o7777)  # after chown, which clears set-id bits
    os.utime(fd, (member.mtime, member.mtime))


def _set_attrs_path(dirfd: int, name: str, member: tarfile.TarInfo, kind: int) -> None:
    """Attributes of a node that cannot be opened for writing (a link, a FIFO): through an
    O_PATH descriptor checked to be what we made, so a swap cannot redirect them."""
    os.chown(name, member.uid, member.gid, dir_fd=dirfd, follow_symlinks=False)
    if kind == stat.S_IFLNK:
        os.utime(name, (member.mtime, member.mtime), dir_fd=dirfd, follow_symlinks=False)
        return
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    try:
        if stat.S_IFMT(os.fstat(fd).st_mode) != kind:
            raise FilesError(f"{member.name} changed while it was being restored")
        # chmod through the descriptor's /proc link acts on that very inode.
        os.chmod(f"/proc/self/fd/{fd}", member.mode & 0o7777)
        os.utime(f"/proc/self/fd/{fd}", (member.mtime, member.mtime))
    finally:
        os.close(fd)


def _copy(src: IO[bytes], fd: int, size: int) -> None:
    left = size
    while left:
        data = src.read(min(_COPY, left))
        if not data:
            raise FilesError("saved files are truncated")
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        left -= len(data)


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    count = 0
    while True:
        try:
            member = tar.next()
        except tarfile.TarError as exc:
            raise FilesError(f"saved files are not a valid archive: {exc}") from exc
        if member is None:
            return
        count += 1
        if count > MAX_ENTRIES:
            raise FilesError(f"more than {MAX_ENTRIES} saved files")
        yield member


def apply(target: str, tar_path: str, changes: Changes | None = None) -> None:
    """Replay a capture onto the tree at `target`: deletions first, then the archive."""
    try:
        _apply(target, tar_path, changes)
    except (OSError, ValueError, OverflowError) as exc:
        raise FilesError(f"could not replay saved files onto {target}: {exc}") from exc


def _apply(target: str, tar_path: str, changes: Changes | None) -> None:
    root = open_dir(target)
    tree = _Tree(root)
    dirs: list[tuple[list[str], tarfile.TarInfo]] = []
    try:
        deletions = [(changes.whiteouts, _remove_at), (changes.opaque, _clear_dir)] if changes else []
        for paths, delete in deletions:
            for rel in paths:
                parts = _components(rel)
                parent = tree.parent(parts, create=False)
                if parent is not None:
                    tree.forget(parts)
                    delete(parent, parts[-1])
        try:
            tar = tarfile.open(tar_path, mode="r:")
        except (tarfile.TarError, OSError) as exc:
            raise FilesError(f"saved files are not a valid archive: {exc}") from exc
        with tar:
            for member in _members(tar):
                parts = _components(member.name)
                parent = tree.parent(parts, create=True)
                assert parent is not None
                _apply_member(tar, tree, parent, parts, member)
                if member.isdir():
                    dirs.append((parts, member))
        # Directory times last: creating their children changed them.
        for parts, member in reversed(dirs):
            parent = tree.parent(parts, create=False)
            if parent is None:
                continue
            with contextlib.suppress(OSError):
                fd = os.open(parts[-1], DIR_FLAGS, dir_fd=parent)
                try:
                    os.utime(fd, (member.mtime, member.mtime))
                finally:
                    os.close(fd)
    finally:
        tree.close()
        os.close(root)


def _apply_member(tar: tarfile.TarFile, tree: _Tree, parent: int, parts: list[str], member: tarfile.TarInfo) -> None:
    name = parts[-1]
    existing = _lstat_at(parent, name)
    if member.isdir():
        if existing is not None and not stat.S_ISDIR(existing.st_mode):
            _remove_at(parent, name)
            existing = None
        if existing is None:
            os.mkdir(name, 0o700, dir_fd=parent)
        try:
            fd = os.open(name, DIR_FLAGS, dir_fd=parent)
        except OSError as exc:
            raise FilesError(f"{member.name}: {exc.strerror}") from None
        try:
            _set_attrs_fd(fd, member)
        finally:
            os.close(fd)
        return
    if existing is not None:
        tree.forget(parts)
        _remove_at(parent, name)
    if member.isreg():
        src = tar.extractfile(member)
        assert src is not None
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=parent)
        try:
            _copy(src, fd, member.size)
            _set_attrs_fd(fd, member)
        finally:
            os.close(fd)
    elif member.issym():
        if len(member.linkname) > MAX_PATH or "\0" in member.linkname:
            raise FilesError(f"{member.name}: unsafe link")
        os.symlink(member.linkname, name, dir_fd=parent)
        _set_attrs_path(parent, name, member, stat.S_IFLNK)
    elif member.isfifo():
        os.mkfifo(name, 0o600, dir_fd=parent)
        _set_attrs_path(parent, name, member, stat.S_IFIFO)
    else:
        raise FilesError(f"{member.name}: saved files may hold only files, directories, links and FIFOs")
