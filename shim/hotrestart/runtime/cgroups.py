"""Small cgroup chores around dumps: freezing a container quiescent, thawing it after."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time

# Where cgroup hierarchies are mounted: v2 at the root; each v1 controller at root/<name>.
ROOT = "/sys/fs/cgroup"


@dataclasses.dataclass(frozen=True, slots=True)
class Membership:
    """One line of /proc/<pid>/cgroup: `hierarchy-ID:controller-list:cgroup-path`."""

    hierarchy: int
    controllers: tuple[str, ...]  # empty for the v2 (unified) hierarchy
    path: str  # absolute, relative to the hierarchy's root

    @property
    def unified(self) -> bool:
        return self.hierarchy == 0 and not self.controllers


def parse(text: str) -> list[Membership]:
    """The memberships in a /proc/<pid>/cgroup text, v1 and v2 lines alike.

    Lines that do not have that shape are skipped, not fatal: the text comes from the
    kernel, but through a file any process may be handed."""
    found: list[Membership] = []
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, colon, path = rest.partition(":")  # the path itself may hold colons
        if not colon or not hierarchy.isdecimal() or not path.startswith("/") or "\0" in path:
            continue
        names = tuple(name for name in controllers.split(",") if name)
        found.append(Membership(int(hierarchy), names, path))
    return found


def of_pid(pid: int) -> list[Membership]:
    """The cgroups `pid` belongs to; none when it is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/cgroup", errors="replace") as f:
            return parse(f.read())
    except OSError:
        return []


def controller_dir(memberships: list[Membership], controller: str, root: str = ROOT) -> str | None:
    """The v1 directory of the hierarchy that holds `controller` (e.g. "memory")."""
    for m in memberships:
        if controller in m.controllers:
            return _beneath(os.path.join(root, controller), m.path)
    return None


def unified_dir(memberships: list[Membership], root: str = ROOT) -> str | None:
    """The v2 (unified) directory, where there is one: at the root on a v2 node, at
    root/unified on a hybrid one (there the root is a tmpfs, and nothing may be written)."""
    mount = next((m for m in (root, os.path.join(root, "unified")) if _is_v2_mount(m)), None)
    if mount is None:
        return None
    for m in memberships:
        if m.unified:
            return _beneath(mount, m.path)
    return None


def unified_host(root: str = ROOT) -> bool:
    """Only the v2 hierarchy on this node (at the root): containerd's "unified" mode. A
    hybrid node (v2 at root/unified beside v1 controllers) is not."""
    return _is_v2_mount(root)


def _is_v2_mount(path: str) -> bool:
    return os.path.exists(os.path.join(path, "cgroup.controllers"))


def _beneath(mount: str, path: str) -> str | None:
    """`path` below `mount`, or None when it leads out of it (a pid seen from another
    cgroup namespace has paths like /../../x)."""
    full = os.path.normpath(os.path.join(mount, path.lstrip("/")))
    return full if full == mount or full.startswith(mount + "/") else None


def thaw(pid: int, where: tuple[str, str] | None = None) -> None:
    """Thaw the freezer cgroup of `pid` (v1 freezer.state, v2 cgroup.freeze); best effort.
    `where` (from `freezer_of`, taken before the freeze) serves when `pid` may have died
    meanwhile: on v2 an emptied cgroup stays frozen, and runc then calls its container
    paused and refuses to delete it."""
    if where is not None:
        with contextlib.suppress(OSError):
            if where[0] == "v1":
                _write(os.path.join(where[1], "freezer.state"), "THAWED")
            else:
                _write(os.path.join(where[1], "cgroup.freeze"), "0")
        return
    memberships = of_pid(pid)
    v1 = controller_dir(memberships, "freezer")
    if v1 is not None:
        with contextlib.suppress(OSError):
            _write(os.path.join(v1, "freezer.state"), "THAWED")
    v2 = unified_dir(memberships)
    if v2 is not None:
        with contextlib.suppress(OSError):
            _write(os.path.join(v2, "cgroup.freeze"), "0")


def freezer_of(pid: int) -> tuple[str, str] | None:
    """("v1", freezer dir) or ("v2", cgroup dir) of `pid`."""
    memberships = of_pid(pid)
    v1 = controller_dir(memberships, "freezer")
    if v1 is not None:
        return "v1", v1
    v2 = unified_dir(memberships)
    return ("v2", v2) if v2 is not None else None


def procs(pid: int) -> list[int]:
    """Every process in the container of `pid` (its freezer cgroup; v2: its cgroup)."""
    found = freezer_of(pid)
    if found is None:
        return [pid]
    try:
        return [int(p) for p in _read(os.path.join(found[1], "cgroup.procs")).split()]
    except (OSError, ValueError):
        return [pid]


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, text: str) -> None:
    # Never O_CREAT: a control file that is not there means a wrong guess at the hierarchy,
    # and a file made on a tmpfs would pass for one next time.
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


# Where a vfork() parent waits for its child to exec or exit (the kernel's wchan names).
_VFORK_WAITS = ("kernel_clone", "wait_for_vfork_done", "_do_fork", "do_fork")


def _in_vfork(tids: list[str]) -> bool:
    """A task waits for a vfork child. (Frozen tasks all show state D, so wchan tells.)"""
    for tid in tids:
        with contextlib.suppress(OSError):
            if _read(f"/proc/{tid}/wchan").strip() in _VFORK_WAITS:
                return True
    return False


def freeze_quiescent(pid: int, attempts: int = 50, delay: float = 0.02) -> bool:
    """Freeze the container of `pid` with no task inside vfork(); False if that never happened.

    A freeze can catch a process in the middle of vfork(): the parent then sleeps in D state
    until its frozen child execs, and CRIU cannot seize it (it gives up after its timeout).
    Thawing and freezing again a moment later lets the child exec. CRIU keeps a cgroup that
    was frozen before it started frozen after a leave-running dump.
    """
    found = freezer_of(pid)
    if found is None or found == freezer_of(os.getpid()):
        return False  # no cgroup of its own: freezing it would freeze the shim too
    version, path = found
    state_file = os.path.join(path, "freezer.state" if version == "v1" else "cgroup.freeze")
    frozen, thawed = ("FROZEN", "THAWED") if version == "v1" else ("1", "0")
    tasks_file = os.path.join(path, "tasks" if version == "v1" else "cgroup.threads")
    try:
        for _ in range(attempts):
            _write(state_file, frozen)
            for _ in range(100):  # the freezer settles within a few ms
                if _settled(version, path):
                    break
                time.sleep(0.005)
            if not _in_vfork(_read(tasks_file).split()):
                return True
            _write(state_file, thawed)
            time.sleep(delay)
    except OSError:
        return False
    return False


def _settled(version: str, path: str) -> bool:
    if version == "v1":
        return _read(os.path.join(path, "freezer.state")).strip() == "FROZEN"
    return "frozen 1" in _read(os.path.join(path, "cgroup.events"))
