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

WINDOW = 4 << 20  # of virtual address space: a chunk of a page image covers at most this
CHUNK = 4 << 20  # of file, for every other file
MIN_CHUNK = 1 << 20  # windows are merged until a chunk holds this much
PAGE = 4096

_PAGES = re.compile(r"pages-([0-9]{1,10})\.img")
_PAGEMAP = re.compile(r"pagemap-[0-9]{1,10}\.img")
# CRIU image magics (criu/include/magic.h): the common prefix and the pagemap's own.
_IMG_COMMON = 0x54564319
_PAGEMAP_MAGIC = 0x56084025
PE_LAZY = 1 << 1
PE_PRESENT = 1 << 2
_MAX_PAGEMAP = 64 << 20

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
    """Per page image id, its runs of present pages from the pagemaps; an unreadable
    pagemap is left out (its page image is then cut at fixed offsets)."""
    found: dict[int, list[tuple[int, int]]] = {}
    for name in os.listdir(images):
        if not _PAGEMAP.fullmatch(name):
            continue
        try:
            with open(os.path.join(images, name), "rb") as f:
                data = f.read(_MAX_PAGEMAP + 1)
            if len(data) > _MAX_PAGEMAP:
                continue
            pages_id, runs = parse_pagemap(data)
        except (OSError, ValueError):
            continue
        found[pages_id] = runs
    return found


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
    pagemap image: a magic pair, then length-prefixed protobuf records, a PagemapHead and
    PagemapEntries. Runs are in page image order; `flags & PE_LAZY` marks those CRIU can
    leave to userfaultfd."""
    if len(data) < 8 or struct.unpack_from("<II", data) != (_IMG_COMMON, _PAGEMAP_MAGIC):
        raise ValueError("not a pagemap image")
    records = []
    at = 8
    while at < len(data):
        if at + 4 > len(data):
            raise ValueError("truncated record")
        (n,) = struct.unpack_from("<I", data, at)
        at += 4
        if at + n > len(data):
            raise ValueError("truncated record")
        records.append(_fields(data[at : at + n]))
        at += n
    if not records or 1 not in records[0]:
        raise ValueError("no pagemap head")
    entries = []
    for fields in records[1:]:
        # nr_pages (5) since CRIU 3.17 took over from the 32-bit compat_nr_pages (2), now 0.
        vaddr, pages = fields.get(1), fields.get(5, fields.get(2))
        if vaddr is None or pages is None:
            raise ValueError("a pagemap entry without address or size")
        flags = fields.get(4)
        if flags is None:  # written before flags existed: in_parent or present
            flags = 0 if fields.get(3, 0) else PE_PRESENT
        if flags & PE_PRESENT and pages:
            entries.append((vaddr, pages, flags))
    return records[0][1], entries


def _fields(msg: bytes) -> dict[int, int]:
    """The varint fields of a protobuf message (the only kind a pagemap record holds)."""
    out: dict[int, int] = {}
    at = 0
    while at < len(msg):
        key, at = _varint(msg, at)
        if key & 7 != 0:
            raise ValueError("a pagemap record field that is not a varint")
        out[key >> 3], at = _varint(msg, at)
    return out


def _varint(buf: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(buf) or shift > 63:
            raise ValueError("bad varint")
        b = buf[at]
        at += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, at
