"""The installed bundle: one folder per version under `<install dir>/versions`, and `current`.

containerd starts the shim through `<install dir>/current/bin/...`, so switching versions is
one rename of the `current` link, and shims already running keep the folder they started
from. A version's folder is named after the bundle's version and a digest of its whole tree,
so a changed bundle never lands on top of an older copy that a running shim still maps. It is
copied beside its final place, marked complete, and renamed into place: a folder there is
whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import stat
from collections.abc import Callable

from hotrestart import bundle
from hotrestart.install import in_use
from hotrestart.install.errors import InstallError
from hotrestart.install.hostfs import HostFS

COMPLETE = ".complete"  # written last in a version's folder
TMP_PREFIX = ".tmp-"
MAX_DEPTH = 32
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_VERSION_CHARS = re.compile(r"[^A-Za-z0-9._+]")


def versions_dir(install_dir: str) -> str:
    return os.path.join(install_dir, "versions")


def current_link(install_dir: str) -> str:
    return os.path.join(install_dir, "current")


def bundle_version(bundle_dir: str) -> str:
    """The version the bundle's marker file gives, made safe for a folder name."""
    try:
        with open(os.path.join(bundle_dir, bundle.MARKER), "rb") as f:
            data = json.loads(f.read(bundle.MAX_MARKER))
    except (OSError, ValueError) as exc:
        raise InstallError(f"{bundle_dir} is not a bundle: cannot read {bundle.MARKER}: {exc}") from None
    version = data.get("version") if isinstance(data, dict) else None
    if not isinstance(version, str) or not version.strip():
        raise InstallError(f"{os.path.join(bundle_dir, bundle.MARKER)} names no version")
    return _VERSION_CHARS.sub("_", version.strip())[:64]


def _entries(folder: str) -> list[os.DirEntry[str]]:
    with os.scandir(folder) as it:
        return sorted(it, key=lambda e: e.name)


def _check_link(root: str, rel: str, target: str) -> None:
    # A link inside the bundle stays inside it: the copy must not reach for the host's files.
    if os.path.isabs(target) or os.path.normpath(os.path.join(os.path.dirname(rel), target)).startswith(".."):
        raise InstallError(f"{os.path.join(root, rel)} links outside the bundle ({target}): refusing to copy it")


def _mode(st: os.stat_result) -> int:
    # Permissions as the bundle has them, less set-id bits and write access for group and
    # others: these are root's programs on the host.
    return stat.S_IMODE(st.st_mode) & 0o755


def tree_digest(root: str) -> str:
    """sha256 over the bundle's tree: every path (sorted), its kind, mode, and content or link."""
    digest = hashlib.sha256()

    def walk(rel: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise InstallError(f"{root} is more than {MAX_DEPTH} folders deep")
        for entry in _entries(os.path.join(root, rel)):
            if entry.name == "__pycache__":
                continue  # Python may write these into the bundle as it runs: no new version for them
            path = os.path.join(rel, entry.name)
            st = entry.stat(follow_symlinks=False)
            name = os.fsencode(path)
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(entry.path)
                _check_link(root, path, target)
                digest.update(b"l\0" + name + b"\0" + os.fsencode(target) + b"\0")
            elif stat.S_ISDIR(st.st_mode):
                digest.update(b"d\0" + name + b"\0" + b"%o\0" % _mode(st))
                walk(path, depth + 1)
            elif stat.S_ISREG(st.st_mode):
                digest.update(b"f\0" + name + b"\0" + b"%o\0" % _mode(st))
                fd = os.open(entry.path, _READ_FLAGS)
                try:
                    content = hashlib.sha256()
                    while chunk := os.read(fd, 1 << 20):
                        content.update(chunk)
                finally:
                    os.close(fd)
                digest.update(content.digest())
            else:
                raise InstallError(f"{entry.path} is a special file: refusing to copy it")

    walk("", 0)
    return digest.hexdigest()


def version_name(bundle_dir: str) -> str:
    """`<version>-<first 12 hex digits of the tree's digest>`."""
    return f"{bundle_version(bundle_dir)}-{tree_digest(bundle_dir)[:12]}"


def _copy_tree(root: str, rel: str, dst_fd: int, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise InstallError(f"{root} is more than {MAX_DEPTH} folders deep")
    for entry in _entries(os.path.join(root, rel)):
        st = entry.stat(follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(entry.path)
            _check_link(root, os.path.join(rel, entry.name), target)
            os.symlink(target, entry.name, dir_fd=dst_fd)
        elif stat.S_ISDIR(st.st_mode):
            os.mkdir(entry.name, 0o700, dir_fd=dst_fd)
            sub = os.open(entry.name, _DIR_FLAGS, dir_fd=dst_fd)
            try:
                _copy_tree(root, os.path.join(rel, entry.name), sub, depth + 1)
                os.fchmod(sub, _mode(st))  # last: a read-only folder is filled first
            finally:
                os.close(sub)
        elif stat.S_ISREG(st.st_mode):
            _copy_file(entry.path, entry.name, dst_fd, _mode(st))
        else:
            raise InstallError(f"{entry.path} is a special file: refusing to copy it")


def _copy_file(src: str, name: str, dst_fd: int, mode: int) -> None:
    fd_in = os.open(src, _READ_FLAGS)
    try:
        if not stat.S_ISREG(os.fstat(fd_in).st_mode):
            raise InstallError(f"{src} is not a regular file")
        fd_out = os.open(
            name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dst_fd
        )
        try:
            while chunk := os.read(fd_in, 1 << 20):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd_out, view) :]
            os.fchmod(fd_out, mode)
        finally:
            os.close(fd_out)
    finally:
        os.close(fd_in)


def _complete(fs: HostFS, folder: str) -> bool:
    st = fs.lstat(os.path.join(folder, COMPLETE))
    return st is not None and stat.S_ISREG(st.st_mode)


def _syncfs(fd: int) -> None:
    """Flush the file system holding `fd` only: sync() would wait on every mount of the node,
    a hung NFS store among them."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"syncfs: {os.strerror(err)}")


def install(fs: HostFS, install_dir: str, bundle_dir: str, name: str, say: Callable[[str], None]) -> bool:
    """Put the bundle at `<versions>/<name>`; False when a complete copy is there already."""
    versions = versions_dir(install_dir)
    final = os.path.join(versions, name)
    if _complete(fs, final):
        say(f"bundle: {name} is installed already ({final})")
        return False
    fs.make_dirs(versions, 0o755)
    for stale in fs.listdir(versions):
        if stale.startswith(TMP_PREFIX):  # an earlier copy cut short
            fs.remove_tree(os.path.join(versions, stale))
    if fs.lstat(final) is not None:  # a folder without its marker: not ours to trust
        fs.remove_tree(final)
    tmp = f"{TMP_PREFIX}{name}-{secrets.token_hex(4)}"
    with fs.folder(versions) as vfd:
        os.mkdir(tmp, 0o700, dir_fd=vfd)
        try:
            fd = os.open(tmp, _DIR_FLAGS, dir_fd=vfd)
            try:
                _copy_tree(bundle_dir, "", fd, 0)
                os.fchmod(fd, 0o755)
                _syncfs(fd)  # every file on disk before the marker says so
                os.close(os.open(COMPLETE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644, dir_fd=fd))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=vfd, dst_dir_fd=vfd)
            os.fsync(vfd)
        except BaseException:
            with contextlib.suppress(OSError, InstallError):
                fs.remove_tree(os.path.join(versions, tmp))
            raise
    say(f"bundle: copied {bundle_dir} to {final}")
    return True


def current(fs: HostFS, install_dir: str) -> str | None:
    """The version `current` points at, when it points at one."""
    target = fs.readlink(current_link(install_dir))
    if target is None:
        return None
    head, _, name = target.rstrip("/").rpartition("/")
    return name if head == "versions" and name else None


def switch(fs: HostFS, install_dir: str, name: str, say: Callable[[str], None]) -> bool:
    """Point `current` at `name` in one rename; False when it already did."""
    before = current(fs, install_dir)
    if not fs.symlink(current_link(install_dir), os.path.join("versions", name)):
        say(f"current: {name} already")
        return False
    say(f"current: {name}" + (f" (was {before})" if before else ""))
    return True


def installed(fs: HostFS, install_dir: str) -> list[str]:
    return [n for n in fs.listdir(versions_dir(install_dir)) if not n.startswith(".")]


def remove_unused(fs: HostFS, install_dir: str, keep: str | None, say: Callable[[str], None]) -> list[str]:
    """Remove every version but `keep` that no host process uses; the versions left in use."""
    candidates = [n for n in installed(fs, install_dir) if n != keep]
    if not candidates:
        return []
    versions = versions_dir(install_dir)
    usage = in_use.scan(fs.root, versions, install_dir)
    if not usage.known:
        say(f"versions: kept {', '.join(candidates)}: cannot tell whether they are in use ({usage.why})")
        return candidates
    left = []
    for name in candidates:
        folder = os.path.join(versions, name)
        if usage.uses(folder):
            say(f"versions: kept {name}: still in use by running processes (shims of pods started with it)")
            left.append(name)
            continue
        try:
            fs.remove_tree(folder)
        except OSError as exc:
            say(f"versions: kept {name}: cannot remove it: {exc}")
            left.append(name)
            continue
        say(f"versions: removed {name} (no longer used)")
    return left
