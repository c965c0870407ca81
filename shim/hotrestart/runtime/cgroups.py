"""Small cgroup chores around dumps: freezing a container quiescent, thawing it after."""

from __future__ import annotations

import contextlib
import os
import time


def thaw(pid: int) -> None:
    """Thaw the freezer cgroup of `pid` (v1 freezer.state, v2 cgroup.freeze); best effort."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return
    for line in lines:
        _hid, controllers, path = line.split(":", 2)
        if "freezer" in controllers.split(","):
            with contextlib.suppress(OSError):
                with open(os.path.join("/sys/fs/cgroup/freezer", path.lstrip("/"), "freezer.state"), "w") as f:
                    f.write("THAWED")
        elif controllers == "":
            with contextlib.suppress(OSError):
                with open(os.path.join("/sys/fs/cgroup", path.lstrip("/"), "cgroup.freeze"), "w") as f:
                    f.write("0")


def _freezer(pid: int) -> tuple[str, str] | None:
    """("v1", freezer dir) or ("v2", cgroup dir) of `pid`."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _hid, controllers, path = line.split(":", 2)
        if "freezer" in controllers.split(","):
            return "v1", os.path.join("/sys/fs/cgroup/freezer", path.lstrip("/"))
    for line in lines:
        _hid, controllers, path = line.split(":", 2)
        if controllers == "":
            return "v2", os.path.join("/sys/fs/cgroup", path.lstrip("/"))
    return None


def procs(pid: int) -> list[int]:
    """Every process in the container of `pid` (its freezer cgroup; v2: its cgroup)."""
    found = _freezer(pid)
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
    with open(path, "w") as f:
        f.write(text)


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
    found = _freezer(pid)
    if found is None:
        return False
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
