"""CRIU's pagemap images (`pagemap-<id>.img`, `pagemap-shmem-<id>.img`): read and written.

A pagemap lists a task's dumped memory as entries in ascending address order: `PE_PRESENT`
runs whose pages follow one another in the page image `pages-<pages_id>.img`, and
`PE_PARENT` runs whose pages are in the parent dump's images (a dump with memory tracking,
where those pages were not written to since). The file is a magic pair, then
length-prefixed protobuf records (criu/images/pagemap.proto): a `pagemap_head {pages_id = 1}`
and `pagemap_entry {vaddr = 1; compat_nr_pages = 2 (required, 0 since CRIU 3.17);
in_parent = 3; flags = 4; nr_pages = 5}`.

The images are CRIU's output about a container's memory layout: read with every size
capped and every entry checked, since a wrong offset here would put one page's bytes at
another's address.
"""

from __future__ import annotations

import dataclasses
import struct

PAGE = 4096
PE_PARENT = 1 << 0
PE_LAZY = 1 << 1
PE_PRESENT = 1 << 2
_KNOWN_FLAGS = PE_PARENT | PE_LAZY | PE_PRESENT
# CRIU image magics (criu/include/magic.h): the common prefix and the pagemap's own.
IMG_COMMON = 0x54564319
PAGEMAP_MAGIC = 0x56084025
_MAGICS = struct.pack("<II", IMG_COMMON, PAGEMAP_MAGIC)
_TOP = 1 << 64  # no address at or past this
MAX_IMAGE = 64 << 20  # a CRIU image read whole (pagemap, mm, core) is refused past this


@dataclasses.dataclass(frozen=True, slots=True)
class Entry:
    vaddr: int
    pages: int
    flags: int

    @property
    def end(self) -> int:
        return self.vaddr + self.pages * PAGE

    @property
    def present(self) -> bool:
        return bool(self.flags & PE_PRESENT)

    @property
    def in_parent(self) -> bool:
        return bool(self.flags & PE_PARENT)


@dataclasses.dataclass(frozen=True, slots=True)
class Pagemap:
    pages_id: int
    entries: tuple[Entry, ...]

    @property
    def present(self) -> tuple[Entry, ...]:
        """The entries whose pages are in this dump's page image, in its order."""
        return tuple(e for e in self.entries if e.present)

    @property
    def present_bytes(self) -> int:
        return sum(e.pages for e in self.present) * PAGE

    @property
    def has_parent_pages(self) -> bool:
        return any(e.in_parent for e in self.entries)


def read(data: bytes) -> Pagemap:
    """Every entry of a pagemap image; ValueError if it is not one, or if its entries are not
    page-aligned, ascending and disjoint, or are both present and in the parent."""
    if len(data) < 8 or data[:8] != _MAGICS:
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
        records.append(varint_fields(data[at : at + n]))
        at += n
    if not records or 1 not in records[0]:
        raise ValueError("no pagemap head")
    entries: list[Entry] = []
    for fields in records[1:]:
        vaddr, pages = fields.get(1), fields.get(5, fields.get(2))
        if vaddr is None or pages is None:
            raise ValueError("a pagemap entry without address or size")
        flags = fields.get(4)
        if flags is None:  # written before flags existed: in_parent or present
            flags = PE_PARENT if fields.get(3, 0) else PE_PRESENT
        if not pages:
            continue
        if flags & ~_KNOWN_FLAGS or (flags & PE_PARENT and flags & PE_PRESENT):
            raise ValueError(f"pagemap entry flags {flags:#x}")
        entry = Entry(vaddr, pages, flags)
        if vaddr % PAGE or entry.end > _TOP or (entries and vaddr < entries[-1].end):
            raise ValueError(f"pagemap entry at {vaddr:#x} out of place")
        entries.append(entry)
    return Pagemap(records[0][1], tuple(entries))


def read_image(path: str) -> bytes:
    """A small CRIU image of a dump, read whole; ValueError past `MAX_IMAGE`."""
    with open(path, "rb") as f:
        data = f.read(MAX_IMAGE + 1)
    if len(data) > MAX_IMAGE:
        raise ValueError(f"{path}: larger than {MAX_IMAGE} bytes")
    return data


def write(pagemap: Pagemap) -> bytes:
    """The image of `pagemap`, as CRIU 4 writes it."""
    out = [_MAGICS, _record([(1, pagemap.pages_id)])]
    for e in pagemap.entries:
        out.append(_record([(1, e.vaddr), (2, 0), (4, e.flags), (5, e.pages)]))
    return b"".join(out)


def _record(fields: list[tuple[int, int]]) -> bytes:
    body = b"".join(_varint_bytes(number << 3) + _varint_bytes(value) for number, value in fields)
    return struct.pack("<I", len(body)) + body


def _varint_bytes(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def varint_fields(msg: bytes) -> dict[int, int]:
    """The varint fields of a protobuf message (the only kind a pagemap record holds)."""
    out: dict[int, int] = {}
    for number, value in any_fields(msg):
        if not isinstance(value, int):
            raise ValueError("a pagemap record field that is not a varint")
        out[number] = value
    return out


def any_fields(msg: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) of every field of a protobuf message: varints as ints, any
    other (length-delimited, fixed-width) as its bytes."""
    out: list[tuple[int, int | bytes]] = []
    at = 0
    while at < len(msg):
        key, at = _varint(msg, at)
        kind = key & 7
        if kind == 0:
            value, at = _varint(msg, at)
            out.append((key >> 3, value))
        elif kind == 2:
            n, at = _varint(msg, at)
            if at + n > len(msg):
                raise ValueError("truncated field")
            out.append((key >> 3, msg[at : at + n]))
            at += n
        elif kind in (1, 5):
            n = 8 if kind == 1 else 4
            if at + n > len(msg):
                raise ValueError("truncated field")
            out.append((key >> 3, msg[at : at + n]))
            at += n
        else:
            raise ValueError(f"protobuf wire type {kind}")
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
