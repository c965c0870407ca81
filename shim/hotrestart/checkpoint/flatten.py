"""Make a dump taken against a parent whole: its parent's pages put in place.

With memory tracking (soft-dirty), CRIU dumps only the pages written to since the parent
dump and marks the rest `PE_PARENT` in the pagemap, leaving them in the parent's page image.
A stored checkpoint must restore on its own (on another node, after the parent is pruned),
so before it is stored each such pagemap is rewritten without parent runs, and its page
image is rebuilt with the parent's pages for them, in address order, as a full dump would
have written it. Where the parent does not hold a page the child says it does, the dump
is refused: a restore must never run on memory that is not the process's.

Pages put in from the parent are marked lazy or not as CRIU would have marked them in a
full dump at the child's time (`lazyrule`: the child's mappings and stack pointers, not the
parent's flags); where that cannot be told, the dump is refused.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import re
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import BinaryIO, Protocol

from hotrestart.checkpoint import lazyrule
from hotrestart.checkpoint.lazyrule import LazyRule
from hotrestart.store import pagemap
from hotrestart.store.pagemap import PAGE, PE_LAZY, PE_PRESENT, Entry, Pagemap

PIECE = 4 << 20  # bytes copied at a time
_PAGEMAP = re.compile(r"pagemap-(?:shmem-)?[0-9]{1,20}\.img")
_TASK_PAGEMAP = re.compile(r"pagemap-([0-9]{1,10})\.img")


class Reader(Protocol):
    def read(self, offset: int, length: int) -> bytes | memoryview: ...


class FileSource:
    """Reads of a page image on the local disk."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise ValueError(f"page image ends at {offset + len(data)}, short of {offset + length}")
        return data


class _ParentIndex:
    """The parent's present runs by address, with where each begins in its page image."""

    def __init__(self, parent: Pagemap) -> None:
        if parent.has_parent_pages:
            raise ValueError("the parent dump is not whole")
        self.runs = parent.present
        self.starts = [e.vaddr for e in self.runs]
        self.offsets = []
        at = 0
        for e in self.runs:
            self.offsets.append(at)
            at += e.pages * PAGE

    def pieces(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """(vaddr, bytes, offset in the parent's image) covering [start, end); ValueError
        where the parent has no page."""
        out = []
        i = bisect.bisect_right(self.starts, start) - 1
        at = start
        while at < end:
            if i < 0 or i >= len(self.runs) or not self.runs[i].vaddr <= at < self.runs[i].end:
                raise ValueError(f"the parent has no page at {at:#x}")
            run = self.runs[i]
            upto = min(end, run.end)
            out.append((at, upto - at, self.offsets[i] + (at - run.vaddr)))
            at = upto
            i += 1
        return out


def flatten(
    child: Pagemap,
    child_pages: Reader,
    parent: Pagemap,
    parent_pages: Reader,
    out: BinaryIO,
    lazy: LazyRule,
    progress: Callable[[], None] = lambda: None,
) -> Pagemap:
    """Write to `out` the page image of `child` with the parent's pages where it has
    `PE_PARENT` runs, and return the pagemap that describes it (no parent runs), lazy
    marks by `lazy`. `progress` is called after every piece copied."""
    index = _ParentIndex(parent)
    entries: list[Entry] = []
    at = 0  # in the child's page image

    def emit(vaddr: int, size: int, flags: int) -> None:
        pages = size // PAGE
        last = entries[-1] if entries else None
        if last is not None and last.end == vaddr and last.flags == flags:
            entries[-1] = Entry(last.vaddr, last.pages + pages, flags)
        else:
            entries.append(Entry(vaddr, pages, flags))

    for e in child.entries:
        size = e.pages * PAGE
        if e.present:
            _copy(child_pages, at, size, out, progress)
            at += size
            emit(e.vaddr, size, e.flags if lazy.known else e.flags & ~PE_LAZY)
        elif e.in_parent:
            for vaddr, length, offset in index.pieces(e.vaddr, e.end):
                _copy(parent_pages, offset, length, out, progress)
                for start, end, is_lazy in lazy.split(vaddr, vaddr + length):
                    emit(start, end - start, PE_PRESENT | (PE_LAZY if is_lazy else 0))
        else:
            raise ValueError(f"a pagemap entry at {e.vaddr:#x} whose pages are nowhere here (flags {e.flags:#x})")
    return Pagemap(child.pages_id, tuple(entries))


def _copy(source: Reader, offset: int, size: int, out: BinaryIO, progress: Callable[[], None]) -> None:
    done = 0
    while done < size:
        n = min(PIECE, size - done)
        data = source.read(offset + done, n)
        if len(data) != n:
            raise ValueError(f"a page image ends short of {offset + done + n}")
        out.write(data)
        done += n
        progress()


# (pagemap file name, pages id) -> the parent's page image, open for as long as it is used
ParentPages = Callable[[str, int], AbstractContextManager[Reader]]


def flatten_images(
    images: str, parent_maps: str, parent_pages: ParentPages, progress: Callable[[], None] = lambda: None
) -> int:
    """Make every pagemap in the folder `images` with parent runs whole, taking the parent's
    pagemaps from the folder `parent_maps` and its page images from `parent_pages`. Returns
    the bytes taken from the parent."""
    taken = 0
    for name in sorted(os.listdir(images)):
        if not _PAGEMAP.fullmatch(name):
            continue
        child = pagemap.read(pagemap.read_image(os.path.join(images, name)))
        if not child.has_parent_pages:
            continue
        try:
            parent = pagemap.read(pagemap.read_image(os.path.join(parent_maps, name)))
        except FileNotFoundError:
            raise ValueError(f"{name}: parent runs, and no parent pagemap") from None
        task = _TASK_PAGEMAP.fullmatch(name)
        try:
            # Shared memory is never restored lazily: nothing there to mark.
            rule = lazyrule.for_task(images, int(task.group(1))) if task else LazyRule.none()
        except OSError as exc:
            raise ValueError(f"{name}: which pages are lazy cannot be told: {exc}") from None
        with parent_pages(name, parent.pages_id) as reader:
            taken += _flatten_one(images, name, child, parent, reader, rule, progress)
    return taken


def _flatten_one(
    images: str,
    name: str,
    child: Pagemap,
    parent: Pagemap,
    parent_pages: Reader,
    lazy: LazyRule,
    progress: Callable[[], None],
) -> int:
    pages_name = f"pages-{child.pages_id}.img"
    src = os.path.join(images, pages_name)
    tmp = src + ".whole"
    try:
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        if child.present_bytes:
            raise
        fd = os.open(src, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        if os.fstat(fd).st_size != child.present_bytes:
            raise ValueError(f"{pages_name} does not hold the pages its pagemap lists")
        with open(tmp, "xb") as out:
            whole = flatten(child, FileSource(fd), parent, parent_pages, out, lazy, progress)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        os.close(fd)
    os.replace(tmp, src)
    map_tmp = os.path.join(images, name + ".whole")
    with open(map_tmp, "xb") as f:
        f.write(pagemap.write(whole))
    os.replace(map_tmp, os.path.join(images, name))
    return whole.present_bytes - child.present_bytes
