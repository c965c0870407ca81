"""Lazy restore: the process runs before its memory is back, and its pages arrive on demand.

Every image but the tasks' page images is unpacked as for a full restore. Of the page
images, only the pages CRIU restores itself (stacks, file-backed private pages: small) are
written, the rest left as holes; CRIU's lazy-pages daemon takes the restored tasks'
userfaultfds and fetches what they fault on, and then everything else in the background,
from `pageserver` (a process of its own) reading the store, every chunk verified. `runc
restore --lazy-pages` returns once the process can run; the container is fully resident
when the daemon exits. Daemon and page server run in process groups of their own, so the
shim going away part-way does not take the memory with it.

The page source failing part-way (a chunk missing or corrupt, the store gone) must never
let the process see memory it did not have: while the daemon lives, a thread faulting on a
page that has not arrived waits in the kernel, so the shim kills the container (SIGKILL)
before it lets the daemon go, and quarantines the checkpoint. The process is killed, the
pod's restart policy applies, and the next create starts cold. The daemon itself dying
early (a crash, the page server gone) would let the kernel hand out zero pages, so the shim
holds its own references to the userfaultfds and kills the container before releasing them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import os
import re
import socket
import sys
import time
from collections.abc import Callable
from typing import TypeVar

from hotrestart.checkpoint.pageserver import PAGE, TaskPages, fill_eager, spec_for, task_pages
from hotrestart.errors import ShimError
from hotrestart.runtime import criu
from hotrestart.runtime.command import CommandRunner, Completed
from hotrestart.store.backend import Backend
from hotrestart.store.config import StoreSource
from hotrestart.store.entry import Entry

log = logging.getLogger(__name__)

READY_TIMEOUT = 10.0
# Stored names keep the `.zst` of the time files were stored whole, compressed.
_PAGEMAP = re.compile(r"images/pagemap-([0-9]{1,10})\.img(?:\.zst)?")
_PAGES = re.compile(r"images/pages-([0-9]{1,10})\.img(?:\.zst)?")
_MAX_PAGEMAP = 64 << 20
_SYS_PIDFD_GETFD = 438  # the same on x86-64 and arm64
T = TypeVar("T")


class LazyFailed(ShimError):
    """Pages could not all be brought back: the restored process must not run on."""


@dataclasses.dataclass
class Unpacked:
    """A checkpoint unpacked for a lazy restore: its entry, where its images are, and each
    task whose memory the page server serves, with its stored page image."""

    entry: Entry
    images: str
    tasks: dict[int, str] = dataclasses.field(default_factory=dict)
    lazy_bytes: int = 0


def lazy_paths(entry: Entry) -> tuple[set[str], dict[str, str]]:
    """(the stored files a lazy restore leaves to `unpack`, {pagemap path: its task id})."""
    assert entry.manifest is not None
    pagemaps = {f.path: m.group(1) for f in entry.manifest.files if (m := _PAGEMAP.fullmatch(f.path))}
    pages = {f.path for f in entry.manifest.files if _PAGES.fullmatch(f.path)}
    return pages, pagemaps


def unpack(
    store: Backend,
    entry: Entry,
    images: str,
    pages: set[str],
    pagemaps: dict[str, str],
    full: Callable[[str], None],
) -> Unpacked:
    """Write the page images `pages` into `images` (whose pagemaps are already there): a
    task's with only its eagerly restored pages, and serving of the rest set up; any other
    (shared memory's, restored by CRIU itself) whole, by `full(path)`. Blocking."""
    assert entry.manifest is not None
    sizes = {f.path: f.raw_bytes for f in entry.manifest.files}
    out = Unpacked(entry, images)
    by_image: dict[int, tuple[int, TaskPages]] = {}
    for path, task_id in pagemaps.items():
        with open(local_path(images, path), "rb") as f:
            data = f.read(_MAX_PAGEMAP + 1)
        if len(data) > _MAX_PAGEMAP:
            raise LazyFailed(f"{path}: larger than {_MAX_PAGEMAP} bytes")
        try:
            layout = task_pages(data)
        except ValueError as exc:
            raise LazyFailed(f"{path}: {exc}") from None
        if layout.pages_id in by_image:
            raise LazyFailed(f"{path}: a page image shared by two tasks")
        by_image[layout.pages_id] = (int(task_id), layout)
    for path in sorted(pages):
        match = _PAGES.fullmatch(path)
        assert match is not None
        found = by_image.get(int(match.group(1)))
        if found is None:
            full(path)
            continue
        task, layout = found
        if sum(r.pages for r in layout.runs) * PAGE != sizes[path]:
            raise LazyFailed(f"{path}: its pagemap does not add up to its size")
        # The eager runs are a few, mostly small: reading far ahead would fetch lazy pages
        # that the page server reads again, and hold up the restore until they are in.
        reader = store.file_reader(entry, path, ahead=2)
        try:
            fill_eager(local_path(images, path), sizes[path], layout, reader)
        finally:
            reader.close()
        out.tasks[task] = path
        out.lazy_bytes += sum(r.pages for r in layout.lazy) * PAGE
    return out


def local_path(images: str, path: str) -> str:
    """Where the stored file `path` is unpacked in the folder `images`."""
    return os.path.join(images, os.path.basename(path).removesuffix(".zst"))


class Daemon:
    """CRIU's lazy-pages daemon for one restore and the page server process feeding it.

    Both run in process groups of their own, so that the shim going away part-way leaves
    the process its memory; while the shim runs, it watches both."""

    def __init__(self, unpacked: Unpacked, source: StoreSource) -> None:
        self.unpacked = unpacked
        self.source = source
        self.started_at = time.monotonic()
        self._ours, self._theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._proc: asyncio.Task[Completed] | None = None
        self._server: asyncio.Task[Completed] | None = None
        self._uffds: list[int] = []
        self.work = ""

    async def start(self, runner: CommandRunner, binary: str, images: str, work: str) -> None:
        """Run the daemon and the page server, and wait until the daemon listens for the
        restore; raises LazyFailed."""
        self.work = work
        loop = asyncio.get_running_loop()
        r, w = os.pipe2(os.O_CLOEXEC)
        ready: asyncio.Future[bytes] = loop.create_future()
        try:
            loop.add_reader(r, _settle, ready, lambda: os.read(r, 1))
            argv = criu.lazy_pages_argv(binary, images, work, self._theirs.fileno(), w)
            self._proc = asyncio.ensure_future(
                runner.run(argv, pass_fds=(self._theirs.fileno(), w), cwd=work, own_group=True)
            )
            spec = spec_for(self.source, self.unpacked.entry, images, self.unpacked.tasks)
            serve = [sys.executable, "-I", "-m", "hotrestart.checkpoint.pageserver", str(self._ours.fileno())]
            self._server = asyncio.ensure_future(
                runner.run(serve, input=spec, pass_fds=(self._ours.fileno(),), own_group=True)
            )
            waits: set[asyncio.Future[object]] = {ready, self._proc, self._server}  # type: ignore[arg-type]
            done, _ = await asyncio.wait(waits, timeout=READY_TIMEOUT, return_when="FIRST_COMPLETED")
            if ready not in done or ready.result() != b"\0":
                why = "the lazy-pages daemon did not start in time"
                if self._proc in done:
                    why = f"the lazy-pages daemon exited ({self._proc.result().returncode}): {self._log_tail()}"
                elif self._server in done:
                    why = f"the page server exited: {_last_line(self._server.result())}"
                raise LazyFailed(why)
        finally:
            loop.remove_reader(r)
            os.close(r)
            os.close(w)
        # Both ends now live in the processes using them: either one dying is seen by the other.
        self._theirs.close()

    def hold_uffds(self) -> None:
        """Take references to the userfaultfds the daemon got from the restore, so that the
        daemon dying early leaves faulting threads waiting instead of reading zero pages."""
        pid = self._pid()
        if not pid:
            return
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd_dir = f"/proc/{pid}/fd"
            for name in os.listdir(fd_dir):
                with contextlib.suppress(OSError):
                    if os.readlink(os.path.join(fd_dir, name)) == "anon_inode:[userfaultfd]":
                        fd = libc.syscall(_SYS_PIDFD_GETFD, pidfd, int(name), 0)
                        if fd >= 0:
                            os.set_inheritable(fd, False)
                            self._uffds.append(fd)
        except OSError as exc:
            log.info("could not hold the userfaultfds of the lazy-pages daemon %d: %s", pid, exc)
        finally:
            os.close(pidfd)
        log.info("holding %d userfaultfd(s) of the lazy-pages daemon %d", len(self._uffds), pid)

    def _pid(self) -> int:
        """The daemon's pid: the shim's child running CRIU in this restore's work folder, in
        the shim's own mount namespace. The container's init is a child of the shim too and
        can write any command line: it never shares that namespace."""
        me = str(os.getpid())
        ours = os.stat("/proc/self/ns/mnt").st_ino
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            with contextlib.suppress(OSError, IndexError):
                with open(f"/proc/{name}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[1] != me:
                        continue
                if os.stat(f"/proc/{name}/ns/mnt").st_ino != ours:
                    continue
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    args = f.read().split(b"\0")
                if b"lazy-pages" in args and self.work.encode() in args:
                    return int(name)
        return 0

    async def resident(self) -> float:
        """Wait until every page has arrived: the seconds it took since the start. Raises
        LazyFailed as soon as either process fails, while faulting threads still wait."""
        assert self._proc is not None and self._server is not None
        waits: set[asyncio.Future[object]] = {self._proc, self._server}  # type: ignore[arg-type]
        await asyncio.wait(waits, return_when="FIRST_COMPLETED")
        if self._server.done() and self._server.result().returncode != 0:
            if not self._proc.done():  # the daemon may be going too: say how it ended
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1):
                        await asyncio.shield(self._proc)
            if not self._proc.done() or self._proc.result().returncode == 0:
                raise LazyFailed(f"the page source failed: {_last_line(self._server.result())}")
        result = await self._proc
        if result.returncode != 0:
            raise LazyFailed(f"the lazy-pages daemon exited {result.returncode}: {self._log_tail()}")
        async with asyncio.timeout(10):
            served = await asyncio.shield(self._server)
        if served.returncode != 0:
            raise LazyFailed(f"the page source failed: {_last_line(served)}")
        return time.monotonic() - self.started_at

    def close(self) -> None:
        """Stop the daemon and the page server (if they run), and let the userfaultfds go."""
        for task in (self._proc, self._server):
            if task is not None and not task.done():
                task.cancel()  # kills its process group
        for sock in (self._ours, self._theirs):
            with contextlib.suppress(OSError):
                sock.close()
        for fd in self._uffds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._uffds = []

    def _log_tail(self) -> str:
        try:
            with open(os.path.join(self.work, "lazy-pages.log"), errors="replace") as f:
                lines = [line for line in f.read().splitlines() if "Error" in line]
        except OSError:
            return "no log"
        return "; ".join(lines[-3:]) or "no error logged"


def _last_line(result: Completed) -> str:
    lines = result.stderr.decode(errors="replace").strip().splitlines()
    return lines[-1][:500] if lines else f"exit {result.returncode}"


def _settle(future: asyncio.Future[T], value: Callable[[], T]) -> None:
    if not future.done():
        future.set_result(value())


__all__ = ["Daemon", "LazyFailed", "Unpacked", "lazy_paths", "local_path", "unpack"]
