"""A page server for CRIU's lazy-pages daemon, reading a checkpoint's memory from the store.

A lazy restore (`lazy.py`) brings back everything of a process but the pages CRIU may leave
to userfaultfd (private anonymous memory, marked PE_LAZY in its pagemap); the daemon
fetches those from here, first the ones a thread faults on, then all the rest in the
background. The protocol is CRIU's page-server one (criu/page-xfer.c), over a connected
socket the daemon inherits: the daemon sends `page_server_iov {u32 cmd; u64 nr_pages;
u64 vaddr; u64 dst_id}` with cmd PS_IOV_GET and dst_id the task's id, and gets the same
header back, cmd PS_IOV_ADD_F with PE_PRESENT, followed by the pages (possibly fewer than
asked for: never past the end of the run of present pages holding `vaddr`). When done, the
daemon sends PS_IOV_FORCE_CLOSE and waits for a 32-bit status, 0.

It runs as a process of its own (`main`), started by the shim for one restore, so that the
shim going away does not take the page source with it.

Nothing is served that is not in the checkpoint: a request outside the lazy runs of a known
task, or a chunk that does not verify, ends serving with an error, and the caller makes
sure the process never runs on without those pages (see `lazy.py`).
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import os
import socket
import struct
import sys
from typing import Any, Protocol

from hotrestart.errors import ShimError
from hotrestart.store import chunking
from hotrestart.store import pagemap as pagemaps
from hotrestart.store.archive import FileReader
from hotrestart.store.config import StoreSource
from hotrestart.store.entry import Entry
from hotrestart.store.manifest import Manifest

PAGE = chunking.PAGE
PS_IOV_ADD_F = 6
PS_IOV_GET = 7
PS_IOV_CLOSE = 0x1023
PS_IOV_FORCE_CLOSE = 0x1024
PS_CMD_BITS = 16
IOV = struct.Struct("<I4xQQQ")  # struct page_server_iov, natural alignment on 64-bit
MAX_REQUEST = 64 << 20  # the daemon asks for at most 4 MiB at a time


class PageServerError(ShimError):
    """The page source cannot serve what the daemon asked for."""


class PageReader(Protocol):
    def read(self, offset: int, length: int) -> bytes | memoryview: ...


@dataclasses.dataclass(frozen=True, slots=True)
class Run:
    vaddr: int
    pages: int
    offset: int  # in the task's page image
    lazy: bool

    @property
    def end(self) -> int:
        return self.vaddr + self.pages * PAGE


@dataclasses.dataclass(frozen=True, slots=True)
class TaskPages:
    """One task's pagemap: its page image's id and its runs of present pages, in file order."""

    pages_id: int
    runs: tuple[Run, ...]

    @property
    def lazy(self) -> tuple[Run, ...]:
        return tuple(r for r in self.runs if r.lazy)

    @property
    def eager(self) -> tuple[Run, ...]:
        return tuple(r for r in self.runs if not r.lazy)


def task_pages(pagemap: bytes) -> TaskPages:
    """A task's runs from its pagemap image (ValueError if it cannot be read, or if pages
    are in a parent: a stored checkpoint is whole)."""
    found = pagemaps.read(pagemap)
    if found.has_parent_pages:
        raise ValueError("a pagemap with pages in a parent dump")
    runs = []
    at = 0
    for e in found.present:
        runs.append(Run(e.vaddr, e.pages, at, bool(e.flags & pagemaps.PE_LAZY)))
        at += e.pages * PAGE
    return TaskPages(found.pages_id, tuple(runs))


class Served:
    """One task's lazy runs, by address, and the reader of its page image."""

    def __init__(self, pages: TaskPages, reader: PageReader) -> None:
        self.runs = sorted(pages.lazy, key=lambda r: r.vaddr)
        self.starts = [r.vaddr for r in self.runs]
        self.reader = reader

    def find(self, vaddr: int) -> Run | None:
        i = bisect.bisect_right(self.starts, vaddr) - 1
        if i >= 0 and vaddr < self.runs[i].end:
            return self.runs[i]
        return None


class PageServer:
    """Serves one daemon on `sock` until it hangs up; raises PageServerError (or the
    reader's error) on anything it cannot serve exactly."""

    def __init__(self, sock: socket.socket, tasks: dict[int, Served]) -> None:
        self.sock = sock
        self.tasks = tasks
        self.served = 0  # bytes
        self.closed = False  # the daemon said it was done

    def serve(self) -> None:
        while True:
            header = _recv_exact(self.sock, IOV.size)
            if not header:
                return  # the daemon is done (or gone: the caller tells which by its exit)
            cmd, nr_pages, vaddr, dst_id = IOV.unpack(header)
            if cmd in (PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE):
                # The daemon is done and waits for our word that we are too.
                self.sock.sendall(struct.pack("<i", 0))
                self.closed = True
                return
            if cmd & ((1 << PS_CMD_BITS) - 1) != PS_IOV_GET:
                raise PageServerError(f"unexpected page server command {cmd:#x}")
            task = self.tasks.get(dst_id)
            if task is None:
                raise PageServerError(f"pages asked for an unknown task {dst_id}")
            run = task.find(vaddr)
            if run is None or vaddr % PAGE or not 0 < nr_pages * PAGE <= MAX_REQUEST:
                raise PageServerError(f"task {dst_id}: {nr_pages} pages at {vaddr:#x} are not lazy memory")
            n = min(nr_pages, (run.end - vaddr) // PAGE)
            data = task.reader.read(run.offset + (vaddr - run.vaddr), n * PAGE)
            reply = IOV.pack(PS_IOV_ADD_F | chunking.PE_PRESENT << PS_CMD_BITS, n, vaddr, dst_id)
            sent = self.sock.sendmsg([reply, data])
            if sent < len(reply) + len(data):  # a blocking stream socket rarely stops short
                rest = (reply + bytes(data))[sent:]
                self.sock.sendall(rest)
            self.served += len(data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = sock.recv(n, socket.MSG_WAITALL)
    while buf and len(buf) < n:  # a signal can cut MSG_WAITALL short
        part = sock.recv(n - len(buf), socket.MSG_WAITALL)
        if not part:
            break
        buf += part
    if buf and len(buf) < n:
        raise PageServerError("the lazy-pages daemon hung up mid-request")
    return buf


def fill_eager(path: str, size: int, pages: TaskPages, reader: PageReader) -> None:
    """The page image `path` as CRIU's restore reads it in lazy mode: `size` bytes, the
    pages it restores itself (not lazy) in place, the lazy ones left as holes it skips."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        for run in pages.eager:
            if run.offset + run.pages * PAGE > size:
                raise PageServerError(f"{path}: the pagemap runs past the page image")
            for at in range(0, run.pages * PAGE, 4 << 20):
                length = min(4 << 20, run.pages * PAGE - at)
                data = reader.read(run.offset + at, length)
                if os.pwrite(fd, data, run.offset + at) != length:
                    raise PageServerError(f"{path}: short write")
    finally:
        os.close(fd)


MAX_SPEC = 64 << 20  # the manifest dominates: 16 MiB at most, JSON-escaped
MAX_PAGEMAP = 64 << 20


def spec_for(source: StoreSource, entry: Entry, images: str, tasks: dict[int, str]) -> bytes:
    """What `main` reads on stdin: the store, the entry (its manifest as the shim read and
    authenticated it), the folder holding its pagemaps, and each task's stored page image."""
    assert entry.manifest is not None
    return json.dumps(
        {
            "store": dataclasses.asdict(source),
            "entry": {"state": entry.state, "id": entry.id, "path": entry.path},
            "manifest": entry.manifest.to_json(),
            "images": images,
            "tasks": {str(task): path for task, path in tasks.items()},
        }
    ).encode()


def serving(spec: dict[str, Any]) -> tuple[dict[int, Served], list[FileReader]]:
    store = StoreSource(**spec["store"]).open()
    e = spec["entry"]
    entry = Entry(e["state"], e["id"], e["path"], Manifest.from_json(spec["manifest"]))
    tasks: dict[int, Served] = {}
    readers = []
    try:
        for task, path in spec["tasks"].items():
            with open(os.path.join(spec["images"], f"pagemap-{int(task)}.img"), "rb") as f:
                layout = task_pages(f.read(MAX_PAGEMAP))
            reader = store.file_reader(entry, path)
            readers.append(reader)
            tasks[int(task)] = Served(layout, reader)
    except BaseException:
        for reader in readers:
            reader.close()
        raise
    return tasks, readers


def main(argv: list[str] | None = None) -> int:
    """`python -m hotrestart.checkpoint.pageserver FD`: serve one lazy restore's memory on
    the connected socket FD, as `spec_for` describes it on stdin. Exits 0 once the daemon
    said it was done, 1 otherwise, with the reason on stderr."""
    args = sys.argv[1:] if argv is None else argv
    try:
        sock = socket.socket(fileno=int(args[0]))
        spec = json.loads(sys.stdin.buffer.read(MAX_SPEC + 1)[:MAX_SPEC])
        tasks, readers = serving(spec)
    except Exception as exc:
        print(f"cannot serve: {exc}", file=sys.stderr)
        return 1
    server = PageServer(sock, tasks)
    try:
        server.serve()
    except Exception as exc:
        print(f"{exc}", file=sys.stderr)
        return 1
    finally:
        for reader in readers:
            reader.close()
    if not server.closed:
        print("the lazy-pages daemon hung up before it was done", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
