"""Where a stored file is cut into chunks, so that what did not change cuts the same way.

A CRIU page image (`pages-<n>.img`) holds a process's present pages in address order, and
its pagemap (`pagemap-<pid>.img`) lists them as runs of contiguous pages. Cut at fixed
offsets of the file, one page more or fewer anywhere early (a heap grown by 4 KiB) would
shift every later chunk and make all of them new. Cut relative to where a run begins, a
run whose first pages come and go moves all of its chunks: that happens whenever two
mappings are merged into one by the kernel (before Linux 6.7, a thread's stack mapped right
below a buffer joins it, and the stack's present pages vary with how deep the thread last
went), or when an allocator hands a page back in the middle of a buffer.

So page images are cut where their content says (content-defined chunking at page
granularity): a page whose fingerprint matches begins a chunk, once the chunk holds
`MIN_CHUNK`; a chunk ends at `MAX_PAGE_CHUNK` at the latest. The same pages give the same
cuts wherever they lie, in this dump or the next, or in another process holding the same
bytes at another (randomised) address; after a change, the cuts are back in step within a
few chunks. A run of `ANCHOR_RUN` or more (a mapping's worth of data) also begins a chunk,
and so does what follows it: two copies of one buffer start their chunks at the same page,
and the small runs after a large one (stacks, which a lazy restore brings back first) do
not share a chunk with its tail. A page's fingerprint is two bytes folded from two of its
words: it costs one pass over two cache lines per page, not a hash of every byte. Any
other file, or a page image whose pagemap cannot be read or does not add up, is cut at
fixed offsets.
"""

from __future__ import annotations

import bisect
import dataclasses
import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator

from hotrestart.store import pagemap

CHUNK = 4 << 20  # of file, for every other file
MIN_CHUNK = 1 << 20  # a page image's chunk holds at least this (but next to a run of `ANCHOR_RUN`)
MAX_PAGE_CHUNK = 4 << 20  # and at most this (what readers hold per chunk stays as it was)
ANCHOR_RUN = 4 << 20  # a run of present pages this long begins a chunk, and so does what follows it
SEGMENT = 256 << 20  # page images are fingerprinted this much at a time
PAGE = pagemap.PAGE

# Past `MIN_CHUNK`, one page in 683 begins a chunk (the first folded word equals `_MARK`,
# the second is below `_BELOW`): chunks of about 2.7 MiB on average, 4 MiB at most (one in
# ten reaches it). A larger minimum or a rarer mark would leave more chunks cut at the
# maximum, whose place depends on the cut before, and the cuts would take longer to get
# back in step after a change.
_WORDS = (65, 193)  # which 8-byte words of a page are folded (byte offsets 520 and 1544)
_MARK = 0x5C  # not 0: runs of zero pages are cut at `MAX_PAGE_CHUNK`, into equal chunks
_BELOW = 96

_PAGES = re.compile(r"pages-([0-9]{1,10})\.img")
# A process's pagemap is named after its pid, a shared memory segment's (pagemap-shmem-<id>)
# after the segment; both name their page image inside.
_PAGEMAP = re.compile(r"pagemap-(shmem-)?([0-9]{1,10})\.img")
# CRIU's mm image magic (criu/include/magic.h).
_MM_MAGIC = 0x57492820
_MM_VMAS = 14  # mm_entry.vmas: repeated vma_entry {start = 1; end = 2; ...}
PE_LAZY = pagemap.PE_LAZY
PE_PRESENT = pagemap.PE_PRESENT

Span = tuple[int, int]  # (offset, length) in the file
Cutter = Callable[[memoryview], Iterable[Span]]  # a file's bytes -> where to cut it, in order


def fixed(size: int, chunk: int = CHUNK) -> list[Span]:
    return [(at, min(chunk, size - at)) for at in range(0, size, chunk)]


def cutter(name: str, runs: dict[int, list[tuple[int, int]]], marked: Marked | None = None) -> Cutter:
    """How to cut the image `name`, given its folder's `page_runs` (and the marked pages
    found while it was written): by content for a page image whose pagemap adds up to its
    size, at fixed offsets otherwise."""
    match = _PAGES.fullmatch(name)
    found = runs.get(int(match.group(1))) if match else None

    def cut(data: memoryview) -> Iterable[Span]:
        if found is not None and sum(n for _, n in found) * PAGE == len(data):
            return by_content(data, found, marked)
        return fixed(len(data))

    return cut


def by_content(data: memoryview, runs: list[tuple[int, int]], marked: Marked | None = None) -> Iterator[Span]:
    """Spans of the page image `data`, whose runs of present pages are `runs` (virtual
    address, pages) in file order: a chunk begins at a marked page once it holds
    `MIN_CHUNK`, at a run of `ANCHOR_RUN` or more, and after `MAX_PAGE_CHUNK`. Produced a
    `SEGMENT` at a time, so that pages are fingerprinted just before they are hashed (a page
    image on disk larger than the page cache is read once, not twice). `marked`: the marked
    pages of a first part of `data`, already found (`Following`)."""
    pages = len(data) // PAGE
    if pages * PAGE != len(data) or data.format != "B" or data.ndim != 1:
        raise ValueError("a page image is a whole number of pages, as bytes")
    anchors, at = [], 0
    for _, n in runs:
        if n * PAGE >= ANCHOR_RUN:
            anchors.append(at)
            if at + n < pages:
                # Also where it ends: the small (often eager) runs after a large lazy one
                # must not share a chunk with its tail, or a lazy restore fetches the tail first.
                anchors.append(at + n)
        at += n
    known, upto = (marked.pages, min(marked.upto, pages)) if marked is not None else ([], 0)
    cuts = Cuts()
    for first in range(0, pages, SEGMENT // PAGE):
        last = min(pages, first + SEGMENT // PAGE)
        found = known[bisect.bisect_left(known, first) : bisect.bisect_left(known, min(last, upto))]
        if last > upto:
            with data[max(first, upto) * PAGE : last * PAGE] as part:
                found += [max(first, upto) + p for p in marked_pages(part)]
        anchored_here = anchors[bisect.bisect_left(anchors, first) : bisect.bisect_left(anchors, last)]
        for page, anchored in sorted([(p, False) for p in found] + [(p, True) for p in anchored_here]):
            yield from cuts.at(page, anchored)
        yield from cuts.reach(last)
    yield from cuts.end(pages)


class Cuts:
    """The cutting rules, given the marked and anchored pages of a page image in order."""

    def __init__(self) -> None:
        self.start = 0  # the first page of the chunk being filled

    def at(self, page: int, anchored: bool) -> Iterator[Span]:
        """The chunks that end before `page`, a marked or anchored page."""
        yield from self.reach(page)
        if page > self.start and (anchored or page - self.start >= MIN_CHUNK // PAGE):
            yield from self._cut(page)

    def reach(self, last: int) -> Iterator[Span]:
        """The chunks that end before `last`, once every marked page before it was given:
        no later page can cut them shorter."""
        while last - self.start > MAX_PAGE_CHUNK // PAGE:
            yield from self._cut(self.start + MAX_PAGE_CHUNK // PAGE)

    def end(self, pages: int) -> Iterator[Span]:
        """The last chunk of an image of `pages` pages."""
        if pages > self.start:
            yield from self._cut(pages)

    def _cut(self, page: int) -> Iterator[Span]:
        yield (self.start * PAGE, (page - self.start) * PAGE)
        self.start = page


@dataclasses.dataclass
class Marked:
    """The marked pages among the first `upto` pages of a page image."""

    pages: list[int] = dataclasses.field(default_factory=list)
    upto: int = 0


class Following:
    """Where to cut a page image that is still being written, by content alone: its
    pagemap is not there yet, so no run anchors a chunk. The spans given are final on those
    terms; once the pagemap is known (`by_content`, given `marked`), only the chunks around a
    large run's two ends are cut differently, and the rest are the same spans."""

    def __init__(self) -> None:
        self.marked = Marked()
        self._cuts = Cuts()

    def grown(self, data: memoryview) -> list[Span]:
        """The spans that the pages of `data` (the image so far, whole pages) add."""
        pages = len(data) // PAGE
        if pages <= self.marked.upto:
            return []
        first = self.marked.upto
        with data[first * PAGE : pages * PAGE] as part:
            found = [first + p for p in marked_pages(part)]
        self.marked.pages += found
        self.marked.upto = pages
        spans = [span for page in found for span in self._cuts.at(page, False)]
        return spans + list(self._cuts.reach(pages))


def marked_pages(data: memoryview) -> list[int]:
    """The pages of `data` (a whole number of pages) whose fingerprint begins a chunk."""
    pages = len(data) // PAGE
    if not pages:
        return []
    folded = []
    with data.cast("Q") as words:
        for w in _WORDS:
            with words[w :: PAGE // 8] as column:
                folded.append(_folded(bytes(column)))
    first, second = folded
    found = []
    page = first.find(_MARK)
    while page >= 0:
        if second[page] < _BELOW:
            found.append(page)
        page = first.find(_MARK, page + 1)
    return found


def _folded(words: bytes) -> bytes:
    """Each 8-byte word of `words` XOR-folded into one byte (one big-integer pass, not a
    Python loop per page)."""
    value = int.from_bytes(words, "big")
    value ^= value >> 32
    value ^= value >> 16
    value ^= value >> 8
    return value.to_bytes(len(words), "big")[7::8]


def page_runs(images: str) -> dict[int, list[tuple[int, int]]]:
    """Per page image id, its runs of present pages from the pagemaps (of processes and of
    shared memory), split where a process's mapping (VMA) begins; an unreadable pagemap is
    left out (its page image is then cut at fixed offsets), an unreadable mm image only
    loses the split."""
    found: dict[int, list[tuple[int, int]]] = {}
    for name in os.listdir(images):
        match = _PAGEMAP.fullmatch(name)
        if not match:
            continue
        try:
            pages_id, runs = parse_pagemap(pagemap.read_image(os.path.join(images, name)))
        except (OSError, ValueError):
            continue
        starts: list[int] = []
        if not match.group(1):  # a process's: its mappings are in its mm image
            try:
                starts = vma_starts(pagemap.read_image(os.path.join(images, f"mm-{match.group(2)}.img")))
            except (OSError, ValueError):
                starts = []
        found[pages_id] = split_at(runs, starts)
    return found


def split_at(runs: list[tuple[int, int]], starts: list[int]) -> list[tuple[int, int]]:
    """`runs` cut where a mapping begins inside one. Pages of two mappings can be contiguous
    (a thread's stack right below a large buffer), and the first one's present pages come
    and go: cut at the mapping, the second's chunks do not move with them."""
    out = []
    i = 0
    for vaddr, pages in runs:
        end = vaddr + pages * PAGE
        while i < len(starts) and starts[i] <= vaddr:
            i += 1
        at = vaddr
        while i < len(starts) and starts[i] < end:
            out.append((at, (starts[i] - at) // PAGE))
            at = starts[i]
            i += 1
        out.append((at, (end - at) // PAGE))
    return out


def vma_starts(data: bytes) -> list[int]:
    """The sorted start addresses of the mappings in an mm image (a magic pair, then one
    length-prefixed MmEntry whose field 14 holds the VmaEntries)."""
    if len(data) < 12 or struct.unpack_from("<II", data) != (pagemap.IMG_COMMON, _MM_MAGIC):
        raise ValueError("not an mm image")
    (n,) = struct.unpack_from("<I", data, 8)
    if 12 + n > len(data):
        raise ValueError("truncated record")
    starts: list[int] = []
    for number, value in pagemap.any_fields(data[12 : 12 + n]):
        if number == _MM_VMAS and isinstance(value, bytes):
            start = next((v for k, v in pagemap.any_fields(value) if k == 1 and isinstance(v, int)), None)
            if start is None or start % PAGE:
                raise ValueError("a mapping without a page-aligned start")
            starts.append(start)
    return sorted(starts)


def parse_pagemap(data: bytes) -> tuple[int, list[tuple[int, int]]]:
    """(pages id, [(vaddr, pages) of each run of contiguous present pages]) of a pagemap
    image. CRIU splits a run into entries where its pipe buffers happen to fill up, which
    depends on everything dumped before it: entries that continue one another are joined,
    so that the same memory is cut the same way in every dump."""
    pages_id, entries = pagemap_entries(data)
    runs: list[tuple[int, int]] = []
    for vaddr, pages, _ in entries:
        if runs and runs[-1][0] + runs[-1][1] * PAGE == vaddr:
            runs[-1] = (runs[-1][0], runs[-1][1] + pages)
        else:
            runs.append((vaddr, pages))
    return pages_id, runs


def pagemap_entries(data: bytes) -> tuple[int, list[tuple[int, int, int]]]:
    """(pages id, [(vaddr, pages, flags) of each run present in the page image]) of a
    pagemap image, in page image order; `flags & PE_LAZY` marks those CRIU can leave to
    userfaultfd."""
    found = pagemap.read(data)
    return found.pages_id, [(e.vaddr, e.pages, e.flags) for e in found.present]
