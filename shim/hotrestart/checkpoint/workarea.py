"""Private work folders for dumps and restores, and the sweep of those a dead shim left.

A work folder holds raw process memory (CRIU's images): on a tmpfs of its own when the
memory is there and within the node's budget for it, otherwise in a folder on disk, so
that no checkpoint needs free memory the size of the container. It is named after the shim
that made it (`<pid>-<name>`), so that a shim or the zygote starting later can tell a
folder in use from one whose shim was SIGKILLed, and unmount and remove the latter instead
of leaving memory-sized tmpfs mounts or disk folders behind for ever.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
from collections.abc import Mapping

from hotrestart.runtime import meminfo, mounts
from hotrestart.sizes import parse_size

log = logging.getLogger(__name__)

ROOT = "/run/hotrestart/work"
# Not under /run: on systemd nodes /run is itself a tmpfs, that is memory again.
DISK_ROOT = "/var/lib/hotrestart/work"
DISK_ENV = "HOTRESTART_WORK_DIR"
MEMORY_ENV = "HOTRESTART_WORK_MEMORY"


@dataclasses.dataclass(frozen=True, slots=True)
class Places:
    """Where work folders go: `memory` holds the tmpfs mounts, `disk` the folders used when
    the images would not fit in `memory_limit` bytes (None: as much as is available)."""

    memory: str = ROOT
    disk: str = DISK_ROOT
    memory_limit: int | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Places:
        """The node's settings: HOTRESTART_WORK_DIR (the disk folder) and
        HOTRESTART_WORK_MEMORY (the most memory one work folder may take, e.g. 8G; 0 for
        disk only). A bad value is reported and ignored: a checkpoint still happens."""
        disk = env.get(DISK_ENV, "") or DISK_ROOT
        if not os.path.isabs(disk) or ".." in disk.split("/"):
            log.error("%s=%r: give an absolute path without '..'; using %s", DISK_ENV, disk, DISK_ROOT)
            disk = DISK_ROOT
        limit = None
        if text := env.get(MEMORY_ENV, ""):
            try:
                limit = parse_size(text)
            except ValueError as exc:
                log.error("%s: %s; no limit applies", MEMORY_ENV, exc)
        return cls(ROOT, os.path.normpath(disk), limit)

    @classmethod
    def under(cls, root: str, memory_limit: int | None = None) -> Places:
        """Both kinds in one folder (tests, tools)."""
        return cls(root, root, memory_limit)

    def roots(self) -> tuple[str, ...]:
        return (self.memory,) if self.disk == self.memory else (self.memory, self.disk)

    def fits_in_memory(self, size: int) -> bool:
        need = int(size * 1.25) + (64 << 20)
        if self.memory_limit is not None and need > self.memory_limit:
            return False
        return size * 1.25 + (256 << 20) < meminfo.available()


def make(places: Places, name: str, size: int, *, prefault: bool = False, extra: int = 0) -> tuple[str, bool]:
    """A private work folder for `size` bytes of images and `extra` bytes beside them: on
    tmpfs when they fit in memory, on disk otherwise. Returns the folder and whether it is
    a tmpfs.

    `prefault` is for dumps that leave the process running: what counts there is how long
    it is frozen, not how long the whole checkpoint takes (a stop wants the latter). A
    folder of the same name left by this very process (a cancelled restore) is replaced."""
    if size and places.fits_in_memory(size + extra):
        path = _fresh(places.memory, name)
        limit = int((size + extra) * 1.25) + (64 << 20)
        # Small pages: huge ones (huge=always) are no faster at 1 GiB and slower beyond it,
        # 4x at 4 GiB here (20.7 s against 5.1 s for a `runc checkpoint`), as the kernel
        # compacts memory to find them while the process is frozen.
        try:
            mounts.mount(mounts.Mount("tmpfs", "tmpfs", ("mode=0700", f"size={limit}")), path)
            if prefault:
                _prefault(path, size)
            return path, True
        except OSError as exc:
            log.info("no tmpfs for %s (%s)", path, exc)
            drop(path, False)
    path = _fresh(places.disk, name)
    log.info("work folder %s on disk (%d MiB of images)", path, (size + extra) >> 20)
    return path, False


def _fresh(root: str, name: str) -> str:
    os.makedirs(root, mode=0o700, exist_ok=True)
    path = os.path.join(root, f"{os.getpid()}-{name}")
    if os.path.lexists(path):
        drop(path, True)
    os.mkdir(path, 0o700)
    return path


def drop(path: str, tmpfs: bool) -> None:
    if tmpfs:
        with contextlib.suppress(OSError):
            mounts.unmount_all(path)
    shutil.rmtree(path, ignore_errors=True)


def _owner_alive(pid: int) -> bool:
    """Whether `pid` is still a hotrestart process (a reused pid of anything else is not)."""
    if pid == os.getpid():
        return True
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    return b"hotrestart" in cmdline


def sweep_all(places: Places) -> list[str]:
    """`sweep` in every folder of `places`."""
    removed = []
    for root in places.roots():
        try:
            removed += sweep(root)
        except OSError as exc:
            log.warning("could not sweep %s: %s", root, exc)
    return removed


def sweep(root: str) -> list[str]:
    """Unmount and remove the work folders of shims that are gone; returns what was removed."""
    try:
        names = os.listdir(root)
    except OSError:
        return []
    removed = []
    for name in names:
        pid, sep, _ = name.partition("-")
        if sep and pid.isdigit() and _owner_alive(int(pid)):
            continue
        path = os.path.join(root, name)
        # Only what is mounted on the folder itself is ours to unmount; the folder is never
        # followed if something replaced it with a link.
        if os.path.islink(path):
            with contextlib.suppress(OSError):
                os.unlink(path)
        else:
            drop(path, True)
        removed.append(name)
        log.info("swept the work folder %s of a shim that is gone", path)
    return removed


def _prefault(path: str, size: int) -> None:
    """Have memory for the images allocated before the process is frozen: fill a file of
    `size` bytes and free it, so CRIU's writes reuse pages that are already backed (a VM's
    host backs fresh guest memory on first touch, which would otherwise happen frozen)."""
    filler = os.path.join(path, ".prefault")
    try:
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            chunk = bytes(8 << 20)  # written, not fallocated: tmpfs fallocate touches nothing
            for _ in range(0, size, len(chunk)):
                os.write(fd, chunk)
        finally:
            os.close(fd)
            os.unlink(filler)
    except OSError as exc:
        log.info("could not prefault %s: %s", path, exc)
