"""The container's own filesystem changes, carried with its checkpoint.

Capture reads the overlay upper directory of the stopped container: files, directories and
links go into a tar; overlay whiteouts (0:0 character devices) and opaque directories are
listed beside it, since they mean "deleted" rather than content. Apply replays that onto
the new container's mounted root before restore.

Applying runs in a helper process chrooted into the target: the image's own symlinks (say
/var/run -> /run) must resolve inside the container, never on the host. The same helper
extracts carried emptyDir volumes.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import tarfile

OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")


def upperdir_of(options: tuple[str, ...]) -> str:
    for opt in options:
        if opt.startswith("upperdir="):
            return opt[len("upperdir=") :]
    return ""


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _is_opaque(path: str) -> bool:
    for name in OPAQUE_XATTRS:
        try:
            if os.getxattr(path, name, follow_symlinks=False) == b"y":
                return True
        except OSError:
            continue
    return False


def capture(source: str, tar_path: str, *, overlay: bool) -> dict[str, list[str]]:
    """Tar `source` into `tar_path`; with `overlay`, whiteouts and opaque dirs are listed."""
    changes: dict[str, list[str]] = {"whiteouts": [], "opaque": []}
    fd = os.open(tar_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(source):
            rel_dir = os.path.relpath(dirpath, source)
            if overlay and rel_dir != "." and _is_opaque(dirpath):
                changes["opaque"].append(rel_dir)
            for name in sorted(dirnames + filenames):
                full = os.path.join(dirpath, name)
                rel = os.path.normpath(os.path.join(rel_dir, name))
                st = os.lstat(full)
                if overlay and _is_whiteout(st):
                    changes["whiteouts"].append(rel)
                    continue
                tar.add(full, arcname=rel, recursive=False)
            dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    return changes


def apply_argv(target: str, tar_path: str, changes_path: str = "") -> list[str]:
    """The helper command that replays a capture onto `target` (chrooted there)."""
    return [sys.executable, "-m", "hotrestart.checkpoint.rootfs", target, tar_path, changes_path]


def _remove(path: str) -> None:
    import shutil

    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _apply_in_chroot(target: str, tar_path: str, changes_path: str) -> None:
    tar = tarfile.open(tar_path, mode="r")
    changes: dict[str, list[str]] = {"whiteouts": [], "opaque": []}
    if changes_path:
        with open(changes_path) as f:
            changes = json.load(f)
    os.chroot(target)
    os.chdir("/")
    for rel in changes["whiteouts"]:
        _remove("/" + rel)
    for rel in changes["opaque"]:
        path = "/" + rel
        if os.path.isdir(path) and not os.path.islink(path):
            for child in os.listdir(path):
                _remove(os.path.join(path, child))
    for member in tar:
        dest = "/" + member.name
        # Replace what is in the way (a file where a directory now is, and so on).
        if not member.isdir():
            _remove(dest)
        elif os.path.lexists(dest) and not os.path.isdir(dest):
            _remove(dest)
        tar.extract(member, "/", set_attrs=True, filter="fully_trusted")
    tar.close()


if __name__ == "__main__":
    _apply_in_chroot(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "")
