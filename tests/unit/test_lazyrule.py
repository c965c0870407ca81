"""Which pages of a dump made whole are left to userfaultfd: as CRIU marks them itself."""

from __future__ import annotations

import struct
from pathlib import Path

from hotrestart.checkpoint import lazyrule
from hotrestart.checkpoint.lazyrule import LazyRule

IMG_COMMON, MM_MAGIC, CORE_MAGIC = 0x54564319, 0x57492820, 0x55053847
PRIVATE, ANON, LOCKED, HUGETLB, SHARED = 0x02, 0x20, 0x2000, 0x40000, 0x01
VDSO, VVAR = 1 << 3, 1 << 12


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _int(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _msg(number: int, body: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(body)) + body


def _image(magic: int, body: bytes) -> bytes:
    return struct.pack("<III", IMG_COMMON, magic, len(body)) + body


def _vma(start: int, end: int, flags: int, status: int = 1) -> bytes:
    return _msg(
        14, _int(1, start) + _int(2, end) + _int(3, 0) + _int(4, 0) + _int(5, 3) + _int(6, flags) + _int(7, status)
    )


def _core(sp: int, arch: int = 1) -> bytes:
    regs = b"".join(_int(n, 0) for n in range(1, 20)) + _int(20, sp) + _int(21, 0)
    return _image(CORE_MAGIC, _int(1, arch) + _msg(2, _int(1, 0) + _msg(2, regs)))


def _dump(tmp: Path, *, arch: int = 1) -> Path:
    mm = _int(1, 7) + _vma(0x400000, 0x401000, PRIVATE)  # a file's private mapping
    mm += _vma(0x10000000, 0x10100000, PRIVATE | ANON)  # the heap
    mm += _vma(0x20000000, 0x20001000, PRIVATE | ANON | LOCKED)
    mm += _vma(0x30000000, 0x30200000, PRIVATE | ANON | HUGETLB)
    mm += _vma(0x40000000, 0x40001000, SHARED | ANON)
    mm += _vma(0x7FF000000000, 0x7FF000010000, PRIVATE | ANON)  # a stack
    mm += _vma(0x7FFF00000000, 0x7FFF00002000, PRIVATE | ANON, VDSO)
    mm += _vma(0x7FFF00002000, 0x7FFF00004000, PRIVATE | ANON, VVAR)
    (tmp / "mm-1.img").write_bytes(_image(MM_MAGIC, mm))
    (tmp / "core-1.img").write_bytes(_core(0x7FF00000F123, arch))
    (tmp / "core-2.img").write_bytes(_core(0x10000010))  # a thread whose stack is in the heap
    return tmp


def test_only_private_anonymous_memory_that_is_not_special_is_lazy(tmp_path: Path) -> None:
    data = (_dump(tmp_path) / "mm-1.img").read_bytes()
    assert lazyrule.lazy_vmas(data) == [(0x10000000, 0x10100000), (0x7FF000000000, 0x7FF000010000)]


def test_the_page_of_every_threads_stack_pointer_is_not_lazy(tmp_path: Path) -> None:
    rule = lazyrule.for_task(str(_dump(tmp_path)), 1)
    assert rule.known
    assert list(rule.split(0x7FF00000E000, 0x7FF000010000)) == [
        (0x7FF00000E000, 0x7FF00000F000, True),
        (0x7FF00000F000, 0x7FF000010000, False),
    ]
    # Another thread's stack page, in the heap: that page alone is restored eagerly.
    assert list(rule.split(0x10000000, 0x10003000)) == [
        (0x10000000, 0x10001000, False),
        (0x10001000, 0x10003000, True),
    ]


def test_pieces_follow_the_mappings_and_the_gaps_between_them(tmp_path: Path) -> None:
    rule = LazyRule([(0x10000, 0x12000), (0x20000, 0x22000)], {0x21000})
    assert list(rule.split(0xF000, 0x23000)) == [
        (0xF000, 0x10000, False),
        (0x10000, 0x12000, True),
        (0x12000, 0x20000, False),
        (0x20000, 0x21000, True),
        (0x21000, 0x22000, False),
        (0x22000, 0x23000, False),
    ]


def test_images_that_cannot_be_read_leave_nothing_lazy(tmp_path: Path) -> None:
    assert not lazyrule.for_task(str(tmp_path), 1).known, "no images"
    assert not lazyrule.for_task(str(_dump(tmp_path, arch=3)), 1).known, "an arm64 thread"
    (tmp_path / "core-2.img").write_bytes(b"\x19\x43\x56\x54")
    assert not lazyrule.for_task(str(tmp_path), 1).known, "a truncated core image"
    assert list(LazyRule.none().split(0x1000, 0x3000)) == [(0x1000, 0x3000, False)]
