"""Which pages of a dump made whole are left to userfaultfd: as CRIU marks them itself."""

from __future__ import annotations

from pathlib import Path

import pytest
from criuimages import ANON, HUGETLB, LOCKED, MM_MAGIC, PRIVATE, SHARED, VDSO, VVAR, core, field, image, vma

from hotrestart.checkpoint import lazyrule
from hotrestart.checkpoint.lazyrule import LazyRule


def _dump(tmp: Path, *, arch: int = 1) -> Path:
    mm = field(1, 7) + vma(0x400000, 0x401000, PRIVATE)  # a file's private mapping
    mm += vma(0x10000000, 0x10100000, PRIVATE | ANON)  # the heap
    mm += vma(0x20000000, 0x20001000, PRIVATE | ANON | LOCKED)
    mm += vma(0x30000000, 0x30200000, PRIVATE | ANON | HUGETLB)
    mm += vma(0x40000000, 0x40001000, SHARED | ANON)
    mm += vma(0x7FF000000000, 0x7FF000010000, PRIVATE | ANON)  # a stack
    mm += vma(0x7FFF00000000, 0x7FFF00002000, PRIVATE | ANON, VDSO)
    mm += vma(0x7FFF00002000, 0x7FFF00004000, PRIVATE | ANON, VVAR)
    (tmp / "mm-1.img").write_bytes(image(MM_MAGIC, mm))
    (tmp / "core-1.img").write_bytes(core(0x7FF00000F123, arch))
    (tmp / "core-2.img").write_bytes(core(0x10000010))  # a thread whose stack is in the heap
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


def test_images_that_cannot_be_read_are_refused(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        lazyrule.for_task(str(tmp_path), 1)  # no images
    with pytest.raises(ValueError, match="not an x86-64 thread"):
        lazyrule.for_task(str(_dump(tmp_path, arch=3)), 1)
    (tmp_path / "core-2.img").write_bytes(b"\x19\x43\x56\x54")
    with pytest.raises(ValueError):
        lazyrule.for_task(str(tmp_path), 1)  # a truncated core image
    assert list(LazyRule.none().split(0x1000, 0x3000)) == [(0x1000, 0x3000, False)]
