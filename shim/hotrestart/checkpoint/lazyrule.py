"""Which pages of a dump CRIU leaves to userfaultfd in a lazy restore, as CRIU decides it.

A page is lazy when its mapping can be (private anonymous memory, not locked, not huge
pages, not the vDSO, vvar or vsyscall area) and it does not hold a thread's stack pointer
(criu/mem.c, `vma_entry_can_be_lazy` and `is_stack`). A dump made whole (`flatten`) must
mark the pages it takes from its parent the same way. Marked eager instead, they made lazy
restores come back with wrong memory in the node VM (full restores of the same checkpoints
were right): CRIU's restore is built for lazy mappings whose only eager pages are stack
pages, and registers a lazy mapping with userfaultfd before it reads the eager pages of
mappings it did not map in advance.

Read from the dump's own images: its mm image (the task's mappings) and the core images
of its threads (their registers, x86-64 only, where incremental dumps are taken). Where they
cannot be read the dump cannot be made whole: marking every page eager would not do either.
"""

from __future__ import annotations

import bisect
import os
import re
import struct
from collections.abc import Iterator

from hotrestart.store import pagemap
from hotrestart.store.pagemap import PAGE

_MM_MAGIC = 0x57492820
_CORE_MAGIC = 0x55053847
_MM_VMAS = 14
_MAP_PRIVATE, _MAP_ANONYMOUS, _MAP_LOCKED, _MAP_HUGETLB = 0x02, 0x20, 0x2000, 0x40000
_VSYSCALL, _VDSO, _VVAR = 1 << 2, 1 << 3, 1 << 12
_X86_64 = 1
_CORE = re.compile(r"core-[0-9]{1,10}\.img")


class LazyRule:
    """The lazy mappings of one task, and the stack pointers of every thread in the dump."""

    def __init__(self, lazy_vmas: list[tuple[int, int]], stack_pages: set[int], *, known: bool = True) -> None:
        self._vmas = sorted(lazy_vmas)
        self._starts = [s for s, _ in self._vmas]
        self._stack = stack_pages
        self.known = known  # False: no page is lazy, the dump's own marks dropped (shared memory)

    @classmethod
    def none(cls) -> LazyRule:
        return cls([], set(), known=False)

    def split(self, vaddr: int, end: int) -> Iterator[tuple[int, int, bool]]:
        """[vaddr, end) as (start, end, lazy) pieces."""
        at = vaddr
        while at < end:
            i = bisect.bisect_right(self._starts, at) - 1
            if i >= 0 and at < self._vmas[i][1]:
                upto = min(end, self._vmas[i][1])
                yield from self._without_stacks(at, upto)
            else:
                nxt = self._starts[i + 1] if i + 1 < len(self._starts) else end
                upto = min(end, max(nxt, at + PAGE))
                yield at, upto, False
            at = upto

    def _without_stacks(self, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
        at = start
        for page in sorted(p for p in self._stack if start <= p < end):
            if page > at:
                yield at, page, True
            yield page, page + PAGE, False
            at = page + PAGE
        if at < end:
            yield at, end, True


def for_task(images: str, task: int) -> LazyRule:
    """The rule for the task whose mm image is `mm-<task>.img` (OSError, ValueError if its
    images cannot be read)."""
    return LazyRule(lazy_vmas(pagemap.read_image(os.path.join(images, f"mm-{task}.img"))), stack_pages(images))


def lazy_vmas(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of the mappings in an mm image that can be lazy."""
    out = []
    for vma in _vmas(_message(data, _MM_MAGIC)):
        fields = {k: v for k, v in pagemap.any_fields(vma) if isinstance(v, int)}
        start, end, flags, status = (fields.get(n) for n in (1, 2, 6, 7))
        if start is None or end is None or flags is None or status is None:
            raise ValueError("a mapping without its bounds or flags")
        if start % PAGE or end % PAGE or end <= start:
            raise ValueError("a mapping not on page boundaries")
        anon_private = flags & _MAP_ANONYMOUS and flags & _MAP_PRIVATE
        if anon_private and not flags & (_MAP_LOCKED | _MAP_HUGETLB) and not status & (_VSYSCALL | _VDSO | _VVAR):
            out.append((start, end))
    return out


def stack_pages(images: str) -> set[int]:
    """The page of every thread's stack pointer, over all tasks of the dump (a page of one
    task's counted in another's only makes it restored eagerly)."""
    pages = set()
    for name in os.listdir(images):
        if not _CORE.fullmatch(name):
            continue
        core = _message(pagemap.read_image(os.path.join(images, name)), _CORE_MAGIC)
        fields = pagemap.any_fields(core)
        if dict((k, v) for k, v in fields if k == 1).get(1) != _X86_64:
            raise ValueError(f"{name}: not an x86-64 thread")
        info = next((v for k, v in fields if k == 2 and isinstance(v, bytes)), None)
        regs = next((v for k, v in pagemap.any_fields(info or b"") if k == 2 and isinstance(v, bytes)), None)
        sp = next((v for k, v in pagemap.any_fields(regs or b"") if k == 20 and isinstance(v, int)), None)
        if sp is None:
            raise ValueError(f"{name}: no stack pointer")
        pages.add(sp & ~(PAGE - 1))
    return pages


def _vmas(mm: bytes) -> Iterator[bytes]:
    for number, value in pagemap.any_fields(mm):
        if number == _MM_VMAS and isinstance(value, bytes):
            yield value


def _message(data: bytes, magic: int) -> bytes:
    """The one record of a single-entry image (a magic pair, then a length-prefixed message)."""
    if len(data) < 12 or struct.unpack_from("<II", data) != (pagemap.IMG_COMMON, magic):
        raise ValueError("not the image expected")
    (n,) = struct.unpack_from("<I", data, 8)
    if 12 + n > len(data):
        raise ValueError("truncated record")
    return data[12 : 12 + n]
