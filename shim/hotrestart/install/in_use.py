"""Which installed files the host's processes are running: a version in use must stay.

A shim started from an older version keeps running it (its interpreter and libraries are
mapped from that version's folder) until its pod goes, long after `current` moved on. The
host's /proc, below the host root, tells: each process's executable and mapped files, as
paths on the host (the kernel resolves `current` to the version's folder). When /proc cannot
be read, nothing can be known, and callers keep everything.

A process whose executable and mappings even root may not read (one protected by the
sandbox it belongs to, say) is no shim of ours: shims are root's own, dumpable processes. Its
command line, which anyone may read, must still not name the install folder.
"""

from __future__ import annotations

import dataclasses
import errno
import os

MAX_MAPS = 16 << 20  # a process's maps file; past this the rest is not read
MAX_CMDLINE = 64 << 10


@dataclasses.dataclass(frozen=True, slots=True)
class Usage:
    paths: frozenset[str]  # paths under the folder asked about that some process uses
    known: bool  # False: /proc could not be read (whole or in part); nothing may be removed
    why: str = ""

    def uses(self, folder: str) -> bool:
        prefix = folder.rstrip("/") + "/"
        return any(p == folder or p.startswith(prefix) for p in self.paths)


class _Unreadable(Exception):
    pass


def _path_of(text: str) -> str:
    return text.removesuffix(" (deleted)")


def _process_paths(proc: str, pid: str, prefix: str) -> set[str]:
    """The paths under `prefix` that process `pid` executes or maps; _Unreadable when denied."""
    found: set[str] = set()
    try:
        exe = _path_of(os.readlink(os.path.join(proc, pid, "exe")))
        if exe.startswith(prefix):
            found.add(exe)
        with open(os.path.join(proc, pid, "maps"), "rb") as f:
            maps = f.read(MAX_MAPS).decode("utf-8", "surrogateescape")
    except (FileNotFoundError, ProcessLookupError):
        return found  # gone, or a kernel thread (no executable, no mappings)
    except PermissionError as exc:
        raise _Unreadable(exc.strerror) from None
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith(prefix):
            found.add(_path_of(fields[5]))
    return found


def _names(proc: str, pid: str, folder: str) -> bool:
    """Whether the command line of `pid` names `folder`."""
    try:
        with open(os.path.join(proc, pid, "cmdline"), "rb") as f:
            return os.fsencode(folder) in f.read(MAX_CMDLINE)
    except (FileNotFoundError, ProcessLookupError):
        return False


def scan(host_root: str, under: str, install_dir: str) -> Usage:
    """The paths below the host folder `under` that the host's processes execute or map."""
    proc = os.path.join(host_root, "proc")
    prefix = under.rstrip("/") + "/"
    try:
        pids = [name for name in os.listdir(proc) if name.isdigit()]
    except OSError as exc:
        return Usage(frozenset(), False, f"cannot read {proc}: {exc.strerror or exc}")
    if not pids:
        return Usage(frozenset(), False, f"{proc} lists no processes (not the host's /proc?)")
    found: set[str] = set()
    for pid in pids:
        try:
            found |= _process_paths(proc, pid, prefix)
        except _Unreadable as exc:
            try:
                if _names(proc, pid, install_dir):
                    return Usage(frozenset(found), False, f"process {pid} runs from {install_dir} and cannot be read")
            except OSError as err:
                return Usage(frozenset(found), False, f"process {pid}: {exc}; its command line: {err.strerror}")
        except OSError as exc:
            if exc.errno in (errno.ESRCH, errno.ENOENT):
                continue
            return Usage(frozenset(found), False, f"cannot read process {pid}: {exc.strerror or exc}")
    return Usage(frozenset(found), True)
