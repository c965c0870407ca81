"""The container's own filesystem changes, carried with its checkpoint.

Capture reads the overlay upper directory of the container (and carried emptyDir volumes):
files, directories, symlinks and FIFOs go into a tar; overlay whiteouts (0:0 character
devices) and opaque directories are listed beside it, since they mean "deleted" rather than
content. Apply replays that onto the new container's mounted root before restore.

Every byte here is the container's: the shim is root and the container (or another
container of the pod sharing a volume) may change the tree while it is walked. So:

- nothing is ever looked up by path from the host's root: each component is opened
  relative to its parent's descriptor with O_NOFOLLOW, so a directory swapped for a
  symlink mid-walk fails that open instead of leading out of the tree;
- symlinks are stored and recreated as links, never followed; ownership, modes and times
  are set on descriptors (or with no-follow calls), never through a path that may have
  become a link;
- owners are numeric: no name lookup, so nothing of the container's (nsswitch.conf, NSS
  modules) is ever read or loaded, and there is no chroot;
- only regular files, directories, symlinks and FIFOs are carried; devices and sockets
  are not (a device node is recreated by nobody: the new container's device rules apply).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import logging
import os
import shutil
import stat
import tarfile
from collections.abc import Iterator
from typing import IO, Any

from hotrestart.errors import FilesError

log = logging.getLogger(__name__)

OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
MAX_DEPTH = 256  # directory levels (one descriptor each while walking)
MAX_ENTRIES = 1_000_000  # files, directories and links in one tree
MAX_NAME = 255
MAX_PATH = 4096

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_COPY = 1 << 20


@dataclasses.dataclass
class Changes:
    """What the tar cannot say: paths deleted (whiteouts) and directories replaced whole."""

    whiteouts: list[str] = dataclasses.field(default_factory=list)
    opaque: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)  # devices, sockets, vanished

    def to_json(self) -> str:
        return json.dumps({"whiteouts": self.whiteouts, "opaque": self.opaque})

    @classmethod
    def from_json(cls, text: str | bytes) -> Changes:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise FilesError(f"the list of deleted files is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise FilesError("the list of deleted files is malformed")
        lists: dict[str, list[str]] = {}
        for key in ("whiteouts", "opaque"):
            value = data.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise FilesError(f"the list of deleted files is malformed ({key})")
            if len(value) > MAX_ENTRIES:
                raise FilesError(f"the list of deleted files is too long ({key})")
            lists[key] = value
        return cls(lists["whiteouts"], lists["opaque"])


def upperdir_of(options: tuple[str, ...]) -> str:
    for opt in options:
        if opt.startswith("upperdir="):
            return opt[len("upperdir=") :]
    return ""


def open_dir(path: str) -> int:
    """A descriptor of the directory `path`, which must not itself be a symlink."""
    return os.open(path, _DIR_FLAGS)


# -- capture ---------------------------------------------------------------------------------------


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
            fd = os.open(name, _DIR_FLAGS, dir_fd=dirfd)
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


# -- apply ---------------------------------------------------------------------------------------


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
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    return None
                os.mkdir(part, 0o755, dir_fd=fd)
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
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
        fd = os.open(name, _DIR_FLAGS, dir_fd=dirfd)
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
                fd = os.open(parts[-1], _DIR_FLAGS, dir_fd=parent)
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
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
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


def load_changes(path: str) -> Changes:
    with open(path, "rb") as f:
        return Changes.from_json(f.read(64 << 20))
