"""CRIU images for unit tests: the mm image of a task and the core image of a thread."""

from __future__ import annotations

import struct
from pathlib import Path

IMG_COMMON, MM_MAGIC, CORE_MAGIC = 0x54564319, 0x57492820, 0x55053847
PRIVATE, ANON, LOCKED, HUGETLB, SHARED = 0x02, 0x20, 0x2000, 0x40000, 0x01
VDSO, VVAR = 1 << 3, 1 << 12


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value)


def message(number: int, body: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(body)) + body


def image(magic: int, body: bytes) -> bytes:
    return struct.pack("<III", IMG_COMMON, magic, len(body)) + body


def vma(start: int, end: int, flags: int, status: int = 1) -> bytes:
    return message(
        14,
        field(1, start) + field(2, end) + field(3, 0) + field(4, 0) + field(5, 3) + field(6, flags) + field(7, status),
    )


def core(sp: int, arch: int = 1) -> bytes:
    regs = b"".join(field(n, 0) for n in range(1, 20)) + field(20, sp) + field(21, 0)
    return image(CORE_MAGIC, field(1, arch) + message(2, field(1, 0) + message(2, regs)))


def plain_task(folder: Path, task: int = 1, *, lazy: bool = False, sp: int = 0x7FF00000F000) -> None:
    """A task whose whole address space is one private anonymous mapping (locked, so that no
    page of it is lazy, unless `lazy`) and whose one thread's stack pointer is `sp`."""
    flags = PRIVATE | ANON | (0 if lazy else LOCKED)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"mm-{task}.img").write_bytes(image(MM_MAGIC, field(1, 7) + vma(0, 1 << 47, flags)))
    (folder / f"core-{task}.img").write_bytes(core(sp))
