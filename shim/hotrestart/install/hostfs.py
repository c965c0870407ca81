"""The host's files, reached below the host root, never through a symbolic link.

The installer is root on the node and the host root is the node's `/`. A link planted where
a folder is expected (by a workload with a hostPath, say) would otherwise turn one of our
writes or removals into one anywhere on the node. So every host path is walked from the host
root one name at a time with O_NOFOLLOW, files are written under a fresh name, fsynced and
renamed into place (never written through), folders we make are 0755 and root's, and folders
that exist already are left as they are.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterator

from hotrestart.install.errors import InstallError
from hotrestart.store import safefs

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
MAX_FILE = 4 << 20  # far more than any containerd configuration


def parts(host_path: str) -> list[str]:
    """The names along an absolute host path; "." and ".." are refused, not resolved."""
    if not host_path.startswith("/"):
        raise InstallError(f"{host_path}: not an absolute path")
    names = [p for p in host_path.split("/") if p]
    if any(p in (".", "..") for p in names):
        raise InstallError(f"{host_path}: '.' and '..' are not allowed")
    return names


def _own(fd: int) -> None:
    # Root's, whoever made the folder above us; only when we are root (tests may not be).
    if os.geteuid() == 0:
        os.fchown(fd, 0, 0)


def _kind(dir_fd: int, name: str) -> str:
    try:
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except OSError:
        return "gone"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISREG(mode):
        return "a file"
    return "a special file"


def _open_dir(dir_fd: int, name: str, where: str, *, create: bool, mode: int) -> int:
    made = False
    if create:
        try:
            os.mkdir(name, mode, dir_fd=dir_fd)
            made = True
        except FileExistsError:
            pass
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise InstallError(f"{where} is {_kind(dir_fd, name)}, not a folder: refusing to go through it") from None
        raise
    if made:  # mkdir's mode went through the umask; a folder that was there keeps its own
        os.fchmod(fd, mode)
        _own(fd)
    return fd


class HostFS:
    """The host's filesystem below `root`; every method takes a host path ("/etc/...")."""

    def __init__(self, root: str) -> None:
        self.root = root

    def real(self, host_path: str) -> str:
        """Where `host_path` is from here (for messages and for reading /proc)."""
        return os.path.join(self.root, host_path.lstrip("/"))

    @contextlib.contextmanager
    def folder(self, host_path: str, *, create: bool = False, mode: int = 0o755) -> Iterator[int]:
        """A descriptor of the folder `host_path`, each step checked (missing ones made with
        `create`). FileNotFoundError when it does not exist and `create` is off."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            where = ""
            for name in parts(host_path):
                where += "/" + name
                nxt = _open_dir(fd, name, where, create=create, mode=mode)
                os.close(fd)
                fd = nxt
            yield fd
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def parent(self, host_path: str, *, create: bool = False) -> Iterator[tuple[int, str]]:
        """The folder holding `host_path` (made 0755 with `create`) and the last name."""
        names = parts(host_path)
        if not names:
            raise InstallError("refusing to work on the host's root itself")
        with self.folder("/" + "/".join(names[:-1]), create=create) as fd:
            yield fd, names[-1]

    def lstat(self, host_path: str) -> os.stat_result | None:
        try:
            with self.parent(host_path) as (fd, name):
                return os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def read(self, host_path: str, limit: int = MAX_FILE) -> bytes | None:
        """The bytes of a regular file; None when it does not exist. Links, special files and
        files over `limit` are refused."""
        try:
            with self.parent(host_path) as (dir_fd, name):
                try:
                    fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENXIO):
                        raise InstallError(f"{host_path} is {_kind(dir_fd, name)}, not a file") from None
                    raise
        except FileNotFoundError:
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise InstallError(f"{host_path} is not a regular file")
            if st.st_size > limit:
                raise InstallError(f"{host_path} is larger than {limit} bytes")
            data = b""
            while len(data) <= limit:
                more = os.read(fd, limit + 1 - len(data))
                if not more:
                    break
                data += more
            if len(data) > limit:
                raise InstallError(f"{host_path} is larger than {limit} bytes")
            return data
        finally:
            os.close(fd)

    def write(self, host_path: str, data: bytes, mode: int) -> bool:
        """Make `host_path` a root-owned file of `data` and `mode`; False when it was already.

        Written under a fresh name, fsynced, renamed into place, the folder fsynced: a crash
        leaves the old file or the new one, and a link or hard link in its place is replaced,
        never written through. Anything but a regular file in its place is refused."""
        with self.parent(host_path, create=True) as (dir_fd, name):
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is not None and not stat.S_ISREG(st.st_mode):
                raise InstallError(f"{host_path} is {_kind(dir_fd, name)}: refusing to replace it")
            same_meta = st is not None and st.st_size == len(data) and stat.S_IMODE(st.st_mode) == mode
            if same_meta and st is not None and st.st_uid == os.geteuid() and self.read(host_path, len(data)) == data:
                return False
            tmp = f".{name}.tmp-{secrets.token_hex(6)}"
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(tmp, flags, 0o600, dir_fd=dir_fd)
            try:
                try:
                    os.fchmod(fd, mode)
                    _own(fd)
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dir_fd)
                raise
            os.fsync(dir_fd)
            return True

    def remove(self, host_path: str) -> bool:
        """Unlink a file or link (never a folder); False when there was nothing."""
        try:
            with self.parent(host_path) as (dir_fd, name):
                try:
                    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                except FileNotFoundError:
                    return False
                if stat.S_ISDIR(st.st_mode):
                    raise InstallError(f"{host_path} is a folder: refusing to remove it")
                os.unlink(name, dir_fd=dir_fd)
                os.fsync(dir_fd)
                return True
        except FileNotFoundError:
            return False

    def make_dirs(self, host_path: str, mode: int) -> bool:
        """Make the folder `host_path` (`mode`) and missing parents (0755); False when it was
        there (its mode is then left alone)."""
        with self.parent(host_path, create=True) as (dir_fd, name):
            try:
                os.mkdir(name, mode, dir_fd=dir_fd)
                made = True
            except FileExistsError:
                made = False
            fd = _open_dir(dir_fd, name, host_path, create=False, mode=mode)  # a real folder, not a link
            try:
                if made:
                    os.fchmod(fd, mode)
                    _own(fd)
            finally:
                os.close(fd)
            return made

    def readlink(self, host_path: str) -> str | None:
        """The target of the link `host_path`; None when there is no link there."""
        try:
            with self.parent(host_path) as (dir_fd, name):
                return os.readlink(name, dir_fd=dir_fd)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # not a link
                return None
            raise

    def symlink(self, host_path: str, target: str) -> bool:
        """Point the link `host_path` at `target` in one step (a new link renamed over the old
        one); False when it already pointed there. A folder or file in its place is refused."""
        with self.parent(host_path, create=True) as (dir_fd, name):
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is not None:
                if not stat.S_ISLNK(st.st_mode):
                    raise InstallError(f"{host_path} is {_kind(dir_fd, name)}, not a link: refusing to replace it")
                if os.readlink(name, dir_fd=dir_fd) == target:
                    return False
            tmp = f".{name}.tmp-{secrets.token_hex(6)}"
            os.symlink(target, tmp, dir_fd=dir_fd)
            try:
                os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dir_fd)
                raise
            os.fsync(dir_fd)
            return True

    def listdir(self, host_path: str) -> list[str]:
        """The names in a folder, sorted; [] when it does not exist."""
        try:
            with self.folder(host_path) as fd:
                return sorted(os.listdir(fd))
        except FileNotFoundError:
            return []

    def remove_tree(self, host_path: str) -> bool:
        """Remove a folder and everything in it, walked by descriptor (links inside are
        removed, never followed); False when there was nothing."""
        try:
            with self.parent(host_path) as (dir_fd, name):
                if _kind(dir_fd, name) == "gone":
                    return False
                safefs.remove_tree(dir_fd, name)
                return True
        except FileNotFoundError:
            return False

    def remove_empty_dir(self, host_path: str) -> bool:
        """rmdir: False when it is missing or not empty."""
        try:
            with self.parent(host_path) as (dir_fd, name):
                os.rmdir(name, dir_fd=dir_fd)
                return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                return False
            raise
