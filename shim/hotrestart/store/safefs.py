"""File operations that never follow a link: the store's only way to touch its tree.

The store may be a shared mount that other nodes write, and it is worked on by root: a
symbolic link planted where a folder is expected would otherwise make a chmod, a write or a
removal land outside the store. Everything here works on directory descriptors: each step
opens one name below an already verified folder with O_NOFOLLOW, files are opened with
O_NONBLOCK (a FIFO cannot hold us) and must turn out regular, modes change with fchmod on
what was opened, and files are written under a fresh name and renamed into place (writing
through an existing name would write through a hard link to a file outside).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
from collections.abc import Iterator

from hotrestart.errors import StoreError

# A name the store itself would write; anything else in the tree is not ours to follow.
NAME = re.compile(r"[A-Za-z0-9._+=,@:-]{1,255}")
MAX_DEPTH = 32  # deeper than any checkpoint we write; a deeper tree is refused, not walked

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class UnsafeEntryError(StoreError, OSError):
    """Something in the store is not what the store puts there: a link, a special file, a
    hard-linked file, a name it would not write, a tree too deep. Never followed or used.

    Also an OSError (EPERM): it stands for a file operation refused, and callers that
    suppress OSError around store changes must keep suppressing it."""

    def __init__(self, what: str, why: str) -> None:
        super().__init__(errno.EPERM, f"{what}: {why}")
        self.what = what
        self.why = why


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISREG(mode):
        return "a file"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device or other special file"


def check_name(name: str) -> str:
    if not NAME.fullmatch(name) or name in (".", ".."):
        raise UnsafeEntryError(repr(name)[:80], "not a name the store writes")
    return name


def open_dir(dir_fd: int, name: str, *, create: bool = False, mode: int = 0o700) -> int:
    """A descriptor of the real folder `name` below `dir_fd` (made, 0700, with `create`)."""
    check_name(name)
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, mode, dir_fd=dir_fd)
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafeEntryError(name, f"is {describe(dir_fd, name)}, not a folder") from None
        raise
    if create:
        try:
            if os.fstat(fd).st_mode & 0o777 != mode:
                os.fchmod(fd, mode)  # mkdir's mode is filtered by the umask
        except BaseException:
            os.close(fd)
            raise
    return fd


@contextlib.contextmanager
def opened_dir(dir_fd: int, name: str, *, create: bool = False) -> Iterator[int]:
    fd = open_dir(dir_fd, name, create=create)
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def walk(dir_fd: int, parts: list[str], *, create: bool = False) -> Iterator[int]:
    """The folder at `parts` below `dir_fd`, every step verified (made with `create`)."""
    fd = os.dup(dir_fd)
    try:
        for part in parts:
            nxt = open_dir(fd, part, create=create)
            os.close(fd)
            fd = nxt
        yield fd
    finally:
        os.close(fd)


def describe(dir_fd: int, name: str) -> str:
    try:
        return _kind(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return "gone"


def open_file(dir_fd: int, name: str) -> int:
    """A read descriptor of the regular file `name`: never a link, never a FIFO's wait."""
    check_name(name)
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeEntryError(name, "is a symbolic link") from None
        if exc.errno == errno.ENXIO:  # a socket
            raise UnsafeEntryError(name, f"is {describe(dir_fd, name)}") from None
        raise
    try:
        check_regular(fd, name)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_regular(fd: int, name: str) -> os.stat_result:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeEntryError(name, f"is {_kind(st.st_mode)}, not a file")
    return st


def read_file(dir_fd: int, name: str, limit: int) -> bytes:
    """The whole of a small regular file; a larger one is refused before it is read."""
    fd = open_file(dir_fd, name)
    try:
        if os.fstat(fd).st_size > limit:
            raise UnsafeEntryError(name, f"is larger than {limit} bytes")
        chunks = []
        left = limit + 1
        while left > 0:
            data = os.read(fd, min(left, 1 << 20))
            if not data:
                break
            chunks.append(data)
            left -= len(data)
        data = b"".join(chunks)
        if len(data) > limit:
            raise UnsafeEntryError(name, f"is larger than {limit} bytes")
        return data
    finally:
        os.close(fd)


def write_file(dir_fd: int, name: str, data: bytes, *, durable: bool = False) -> None:
    """Write `name` (0600) as a new file renamed into place: whatever was there, a link
    included, is replaced, never written through."""
    check_name(name)
    tmp = f".tmp-{secrets.token_hex(6)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def write_exclusive(dir_fd: int, name: str, data: bytes) -> None:
    """Create `name` (0600) with `data`; FileExistsError when anything is there already."""
    check_name(name)
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def unlink(dir_fd: int, name: str) -> None:
    """Remove a non-folder name (a link itself, not its target); gone already is fine."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)


def remove_tree(dir_fd: int, name: str) -> None:
    """Remove `name` below `dir_fd`: a folder with everything in it, walked by descriptor;
    a link or any other file is unlinked itself."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        unlink(dir_fd, name)
        return
    fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    try:
        _empty(fd, 0)
    finally:
        os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(name, dir_fd=dir_fd)


def _empty(fd: int, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise UnsafeEntryError("store tree", f"is more than {MAX_DEPTH} folders deep")
    with os.scandir(fd) as it:
        names = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
    for name, is_dir in names:
        if not is_dir:
            unlink(fd, name)
            continue
        try:
            sub = os.open(name, _DIR_FLAGS, dir_fd=fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # swapped for a link meanwhile
                unlink(fd, name)
                continue
            if exc.errno == errno.ENOENT:
                continue
            raise
        try:
            _empty(sub, depth + 1)
        finally:
            os.close(sub)
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(name, dir_fd=fd)


def tree_size(fd: int, depth: int = 0) -> int:
    """Bytes in the regular files below the folder `fd` (links and special files count 0)."""
    if depth > MAX_DEPTH:
        return 0
    total = 0
    with os.scandir(fd) as it:
        listing = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
    for name, is_dir in listing:
        try:
            if is_dir:
                sub = os.open(name, _DIR_FLAGS, dir_fd=fd)
                try:
                    total += tree_size(sub, depth + 1)
                finally:
                    os.close(sub)
            else:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISREG(st.st_mode):
                    total += st.st_size
        except OSError:
            continue
    return total


def make_private(fd: int, depth: int = 0) -> None:
    """Folders 0700 and files 0600 below the folder `fd`, by descriptor. Anything but
    folders and regular files of one link is refused: a chmod through a hard link would
    change a file outside the store."""
    if depth > MAX_DEPTH:
        raise UnsafeEntryError("checkpoint", f"is more than {MAX_DEPTH} folders deep")
    os.fchmod(fd, 0o700)
    with os.scandir(fd) as it:
        listing = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
    for name, is_dir in listing:
        if is_dir:
            with opened_dir(fd, name) as sub:
                make_private(sub, depth + 1)
            continue
        f = open_file(fd, name)
        try:
            if os.fstat(f).st_nlink > 1:
                raise UnsafeEntryError(name, "has other hard links")
            os.fchmod(f, 0o600)
        finally:
            os.close(f)


def fsync(fd: int) -> None:
    os.fsync(fd)


def mtime(dir_fd: int, name: str) -> float:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mtime
    except OSError:
        return 0.0
