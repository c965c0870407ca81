"""Host-level helpers of the test bed: processes, mounts, cgroups, links.

Everything here works from /proc and /sys directly (no psutil), and every
cleanup function is best effort: it never raises for a thing that is already
gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

MNT_DETACH = 2


# -- processes -----------------------------------------------------------------


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    state: str
    cmdline: tuple[str, ...]

    @property
    def exe_name(self) -> str:
        return os.path.basename(self.cmdline[0]) if self.cmdline else ""

    def arg_after(self, flag: str) -> str | None:
        """Value of ``flag VALUE`` or ``flag=VALUE`` in the command line."""
        for i, a in enumerate(self.cmdline):
            if a == flag and i + 1 < len(self.cmdline):
                return self.cmdline[i + 1]
            if a.startswith(flag + "="):
                return a[len(flag) + 1 :]
        return None


def _stat(pid: int) -> tuple[str, int] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may contain spaces and parentheses: split after the last ')'.
    rest = raw[raw.rfind(")") + 2 :].split()
    return rest[0], int(rest[1])


def proc(pid: int) -> Proc | None:
    st = _stat(pid)
    if st is None:
        return None
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    args = tuple(a.decode(errors="replace") for a in raw.split(b"\0") if a)
    return Proc(pid, st[1], st[0], args)


def processes(include_zombies: bool = False) -> list[Proc]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        p = proc(int(entry))
        if p is not None and (include_zombies or p.state != "Z"):
            out.append(p)
    return out


def descendants(roots: Iterable[int], procs: list[Proc] | None = None) -> set[int]:
    """``roots`` and all their (transitive) children."""
    procs = processes() if procs is None else procs
    children: dict[int, list[int]] = {}
    for p in procs:
        children.setdefault(p.ppid, []).append(p.pid)
    seen: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        todo.extend(children.get(pid, ()))
    return seen


def mapping(prefix: str) -> list[int]:
    """The processes that have a file under `prefix` mapped (or run one from there)."""
    found = []
    for p in processes():
        with contextlib.suppress(OSError), open(f"/proc/{p.pid}/maps") as f:
            if prefix in f.read():
                found.append(p.pid)
    return found


def environ(pid: int) -> dict[str, str]:
    """The environment a process was exec'd with ({} when unreadable)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    env = {}
    for item in raw.split(b"\0"):
        k, sep, v = item.partition(b"=")
        if sep:
            env[k.decode(errors="replace")] = v.decode(errors="replace")
    return env


def alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def cgroups_of(pid: int) -> list[tuple[str, str]]:
    """(controllers, path) pairs from /proc/PID/cgroup."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3:
            out.append((parts[1], parts[2]))
    return out


def kill_all(pids: Iterable[int], timeout: float = 10.0) -> set[int]:
    """SIGKILL ``pids`` (thawing frozen cgroups first); return those still alive."""
    pids = {p for p in pids if p != os.getpid()}
    if not pids:
        return set()
    for pid in pids:
        for _, path in cgroups_of(pid):
            thaw(path)
    deadline = time.monotonic() + timeout
    left = set(pids)
    while left:
        for pid in list(left):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
        left = {p for p in left if alive(p)}
        if time.monotonic() > deadline:
            break
    return left


# -- cgroups -------------------------------------------------------------------


def cgroup_mounts() -> list[Path]:
    """Mount points of all cgroup (v1) and cgroup2 file systems."""
    out = []
    for m in mountinfo():
        if m.fstype in ("cgroup", "cgroup2"):
            out.append(Path(m.mount_point))
    return out


def thaw(cgroup_path: str) -> None:
    """Thaw a v1 freezer cgroup (a frozen task ignores even SIGKILL)."""
    for mnt in cgroup_mounts():
        state = mnt / cgroup_path.lstrip("/") / "freezer.state"
        if state.exists():
            with contextlib.suppress(OSError):
                if state.read_text().strip() != "THAWED":
                    state.write_text("THAWED")
        v2 = mnt / cgroup_path.lstrip("/") / "cgroup.freeze"
        if v2.exists():
            with contextlib.suppress(OSError):
                v2.write_text("0")


def stop_systemd_unit(unit: str) -> list[str]:
    """Stop a systemd unit (a slice stops every scope in it, killing their processes) and
    forget its failure; the problems met."""
    if not Path("/run/systemd/system").is_dir():
        return []
    problems = []
    for argv in (["systemctl", "stop", unit], ["systemctl", "reset-failed", unit]):
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            problems.append(f"{' '.join(argv)}: {exc}")
            continue
        if done.returncode != 0 and "not loaded" not in done.stderr:
            problems.append(f"{' '.join(argv)}: {done.stderr.strip()}")
    return problems


def remove_cgroup_trees(rel_paths: Iterable[str]) -> list[str]:
    """rmdir the given cgroups and all their children in every hierarchy.

    Returns the directories that could not be removed (still populated).
    """
    failed: list[str] = []
    rels = [r.strip("/") for r in rel_paths if r.strip("/")]
    for mnt in cgroup_mounts():
        for rel in rels:
            top = mnt / rel
            if not top.is_dir():
                continue
            dirs = [Path(d) for d, _, _ in os.walk(top)]
            for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
                try:
                    d.rmdir()
                except FileNotFoundError:
                    pass
                except OSError:
                    failed.append(str(d))
    return failed


# -- mounts --------------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    mount_id: int
    mount_point: str
    fstype: str
    source: str


def _unescape(s: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 4 <= len(s) and s[i + 1 : i + 4].isdigit():
            out.append(chr(int(s[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def mountinfo(pid: int | str = "self") -> list[Mount]:
    out = []
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        f = left.split()
        r = right.split()
        out.append(Mount(int(f[0]), _unescape(f[4]), r[0] if r else "", r[1] if len(r) > 1 else ""))
    return out


def mounts_under(prefix: str | Path) -> list[str]:
    """Mount points at or below ``prefix``, deepest (and newest) first."""
    pre = str(prefix).rstrip("/")
    found = [
        (m.mount_id, m.mount_point) for m in mountinfo() if m.mount_point == pre or m.mount_point.startswith(pre + "/")
    ]
    found.sort(key=lambda t: (t[1].count("/"), t[0]), reverse=True)
    return [mp for _, mp in found]


_libc: ctypes.CDLL | None = None


def _umount2(path: str, flags: int) -> int:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.umount2(os.fsencode(path), flags) == 0:
        return 0
    return ctypes.get_errno()


def unmount_all(prefix: str | Path, rounds: int = 5) -> list[str]:
    """Unmount everything under ``prefix`` (lazily if busy); return what remains."""
    for _ in range(rounds):
        mps = mounts_under(prefix)
        if not mps:
            return []
        for mp in mps:
            err = _umount2(mp, 0)
            if err in (errno.EBUSY, errno.EAGAIN):
                err = _umount2(mp, MNT_DETACH)
            if err not in (0, errno.EINVAL, errno.ENOENT):
                _umount2(mp, MNT_DETACH)
    return mounts_under(prefix)


# -- sockets -------------------------------------------------------------------


def _socket_inodes(pid: int) -> set[str]:
    inodes: set[str] = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return inodes
    for fd in fds:
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


def _unix_sockets() -> dict[str, str]:
    """inode -> bound path, for every unix socket bound to a file system path."""
    out: dict[str, str] = {}
    try:
        lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        return out
    for line in lines:
        f = line.split()
        if len(f) >= 8 and f[7].startswith("/"):
            out[f[6]] = f[7]
    return out


def unix_socket_paths(pids: Iterable[int]) -> set[str]:
    """Paths of the unix sockets (listening or not) that ``pids`` hold open."""
    bound = _unix_sockets()
    paths: set[str] = set()
    for pid in pids:
        paths.update(bound[i] for i in _socket_inodes(pid) if i in bound)
    return paths


def socket_holders(path: str | Path, pids: Iterable[int]) -> set[int]:
    """Those of ``pids`` that hold a unix socket bound at ``path`` open."""
    want = {i for i, p in _unix_sockets().items() if p == str(path)}
    if not want:
        return set()
    return {pid for pid in pids if _socket_inodes(pid) & want}


# -- network -------------------------------------------------------------------


def link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def delete_link(name: str) -> None:
    if link_exists(name):
        subprocess.run(["ip", "link", "delete", name], capture_output=True, check=False)


# -- misc ----------------------------------------------------------------------


# How much slower than a real node this machine is (hack/vm.py sets it under emulation):
# every wait of the test bed and the tests is that much longer.
TIME_SCALE = float(os.environ.get("HOTRESTART_E2E_TIME_SCALE", "1"))
# The kubelet's default --runtime-request-timeout: the deadline of every CRI call it makes.
CRI_REQUEST_TIMEOUT = 120.0


def wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Whether `pred` came true within `timeout` seconds (times `TIME_SCALE`)."""
    deadline = time.monotonic() + timeout * TIME_SCALE
    while True:
        if pred():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
