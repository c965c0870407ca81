"""Where a stored file is cut into chunks, so that what did not change cuts the same way.

A CRIU page image (`pages-<n>.img`) holds a process's present pages in address order, and
its pagemap (`pagemap-<pid>.img`) lists them as runs of contiguous pages. Cut at fixed
offsets of the file, one page more or fewer anywhere early (a heap grown by 4 KiB) would
shift every later chunk and make all of them new. So page images are cut where each run
of pages begins and every `WINDOW` bytes into it: a region of memory that did not change
gives the same chunks in every dump, wherever it lies in the file, and, cut relative to
its own start rather than at absolute addresses, also in another process that holds the
same bytes at another (randomised) address. Small runs (the scattered pages of libraries)
are merged up to `MIN_CHUNK`. Any other file, or a page image whose pagemap cannot be read
or does not add up, is cut at fixed offsets.
"""

from __future__ import annotations

import os
import re
import struct

from hotrestart.store import pagemap

WINDOW = 4 << 20  # of virtual address space: a chunk of a page image covers at most this
CHUNK = 4 << 20  # of file, for every other file
MIN_CHUNK = 1 << 20  # windows are merged until a chunk holds this much
PAGE = pagemap.PAGE

_PAGES = re.compile(r"pages-([0-9]{1,10})\.img")
_PAGEMAP = re.compile(r"pagemap-([0-9]{1,10})\.img")
# CRIU's mm image magic (criu/include/magic.h).
_MM_MAGIC = 0x57492820
_MM_VMAS = 14  # mm_entry.vmas: repeated vma_entry {start = 1; end = 2; ...}
PE_LAZY = pagemap.PE_LAZY
PE_PRESENT = pagemap.PE_PRESENT

Span = tuple[int, int]  # (offset, length) in the file


def fixed(size: int, chunk: int = CHUNK) -> list[Span]:
    return [(at, min(chunk, size - at)) for at in range(0, size, chunk)]


def spans(name: str, size: int, runs: dict[int, list[tuple[int, int]]]) -> list[Span]:
    """How to cut the image `name` (`size` bytes long), given its folder's `page_runs`."""
    match = _PAGES.fullmatch(name)
    if match:
        found = runs.get(int(match.group(1)))
        if found is not None and sum(n for _, n in found) * PAGE == size:
            return by_run(found)
    return fixed(size)


def by_run(runs: list[tuple[int, int]]) -> list[Span]:
    """Spans of a page image from its runs of present pages (virtual address, pages), in
    file order: a run of a window or more starts a chunk and is cut every `WINDOW` bytes
    from its start; smaller runs are gathered until a chunk holds `MIN_CHUNK`."""
    out: list[Span] = []
    start = at = 0
    for _, pages in runs:
        length = pages * PAGE
        if at > start and (length >= WINDOW or at - start >= MIN_CHUNK):
            out.append((start, at - start))
            start = at
        if length < WINDOW:
            at += length
            continue
        for off in range(0, length, WINDOW):
            piece = min(WINDOW, length - off)
            out.append((at, piece))
            at += piece
        start = at
    if at > start:
        out.append((start, at - start))
    return out


def page_runs(images: str) -> dict[int, list[tuple[int, int]]]:
    """Per page image id, its runs of present pages from the pagemaps, split where a
    mapping (VMA) begins; an unreadable pagemap is left out (its page image is then cut at
    fixed offsets), an unreadable mm image only loses the split."""
    found: dict[int, list[tuple[int, int]]] = {}
    for name in os.listdir(images):
        match = _PAGEMAP.fullmatch(name)
        if not match:
            continue
        try:
            pages_id, runs = parse_pagemap(pagemap.read_image(os.path.join(images, name)))
        except (OSError, ValueError):
            continue
        try:
            starts = vma_starts(pagemap.read_image(os.path.join(images, f"mm-{match.group(1)}.img")))
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
