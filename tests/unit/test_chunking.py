"""Where files are cut into chunks: page images by content, so unchanged memory cuts the same."""

from __future__ import annotations

import os
import random
import struct

import blake3
import pytest

from hotrestart.store import chunking
from hotrestart.store.chunking import ANCHOR_RUN, MAX_PAGE_CHUNK, MIN_CHUNK, PAGE


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _record(**fields: int) -> bytes:
    numbers = {"pages_id": 1, "vaddr": 1, "compat_nr_pages": 2, "in_parent": 3, "flags": 4, "nr_pages": 5}
    body = b"".join(_varint(numbers[k] << 3) + _varint(v) for k, v in fields.items())
    return struct.pack("<I", len(body)) + body


def _pagemap(pages_id: int, entries: list[tuple[int, int, int]], *, compat: bool = False) -> bytes:
    """A pagemap image as CRIU 4 writes it (the count in nr_pages, compat_nr_pages 0), or,
    with `compat`, as releases before 3.17 did (the count in compat_nr_pages)."""
    out = struct.pack("<II", 0x54564319, 0x56084025) + _record(pages_id=pages_id)
    for vaddr, nr, flags in entries:
        if compat:
            out += _record(vaddr=vaddr, compat_nr_pages=nr, flags=flags)
        else:
            out += _record(vaddr=vaddr, compat_nr_pages=0, flags=flags, nr_pages=nr)
    return out


@pytest.mark.parametrize("compat", [False, True], ids=["criu4", "before-3.17"])
def test_a_pagemap_gives_its_present_runs_in_order(compat: bool) -> None:
    present, parent, lazy = 4, 1, 2
    entries = [(0x400000, 3, present), (0x500000, 8, parent), (0x7F0000000000, 2, present | lazy)]
    data = _pagemap(7, entries, compat=compat)
    assert chunking.parse_pagemap(data) == (7, [(0x400000, 3), (0x7F0000000000, 2)])
    assert chunking.pagemap_entries(data)[1][1] == (0x7F0000000000, 2, present | lazy)


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00" * 8, _pagemap(1, [(1, 1, 4)])[:-1], struct.pack("<II", 0x54564319, 0x56084025)],
)
def test_a_bad_pagemap_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        chunking.parse_pagemap(data)


def _image(runs: list[tuple[int, int]], memory: dict[int, bytes]) -> bytes:
    return b"".join(memory[vaddr + i * PAGE] for vaddr, nr in runs for i in range(nr))


def _cut(image: bytes, runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    spans = list(chunking.by_content(memoryview(image), runs))
    at = 0
    for start, n in spans:
        assert start == at and 0 < n <= MAX_PAGE_CHUNK and n % PAGE == 0
        at += n
    assert at == len(image)
    return spans


def _chunk_digests(runs: list[tuple[int, int]], memory: dict[int, bytes]) -> set[str]:
    image = _image(runs, memory)
    return {blake3.blake3(image[at : at + n]).hexdigest() for at, n in _cut(image, runs)}


def _pages(n: int, seed: int) -> list[bytes]:
    """`n` pages as a program's data looks to the fingerprint: random, half of each zero."""
    rng = random.Random(seed)
    return [rng.randbytes(PAGE // 2) + bytes(PAGE // 2) for _ in range(n)]


def test_unchanged_memory_cuts_the_same_when_pages_before_it_come_and_go() -> None:
    """A heap that grew by a page shifts the page image; the big region's chunks do not change."""
    big = 0x7F0000000000 + 4096 * 3  # not aligned on purpose
    big_pages = 64 << 20 >> 12
    heap = 0x600000
    memory = {heap + i * PAGE: os.urandom(16) * 256 for i in range(40)}
    memory.update({big + i * PAGE: d for i, d in enumerate(_pages(big_pages, 6))})
    before = [(heap, 30), (big, big_pages)]
    after = [(heap, 37), (big, big_pages)]
    a, b = _chunk_digests(before, memory), _chunk_digests(after, memory)
    assert len(a - b) == 1, "all but the chunk that holds the heap are the same"


def test_a_stack_merged_into_a_buffers_mapping_does_not_move_its_chunks() -> None:
    """Before Linux 6.7 a thread's stack mapped right below a buffer is one mapping with it,
    so nothing marks where the buffer begins; how many stack pages are present changes from
    dump to dump. Cut by content, only the chunk holding the stack's pages changes, and the
    one after it where that chunk ended at the size cap (which moves with the stack)."""
    buf, n = 0x7F0000100000, (64 << 20) // PAGE
    data = _pages(n + 8, 1)
    memory = {buf - 8 * PAGE + i * PAGE: d for i, d in enumerate(data)}
    one = _chunk_digests([(buf - 2 * PAGE, 2 + n)], memory)
    two = _chunk_digests([(buf - 7 * PAGE, 7 + n)], memory)
    assert len(one) >= 8
    assert 1 <= len(one - two) <= 2 and len(one & two) >= len(one) - 2


def test_a_page_handed_back_inside_a_buffer_changes_only_the_chunks_around_it() -> None:
    """An allocator returns a page in the middle of a buffer: the run splits in two, and
    the chunks after the hole are cut where they were once the cuts are back in step."""
    buf, n = 0x7F0000000000, (64 << 20) // PAGE
    memory = {buf + i * PAGE: d for i, d in enumerate(_pages(n, 2))}
    hole = n // 3
    whole = _chunk_digests([(buf, n)], memory)
    holed = _chunk_digests([(buf, hole), (buf + (hole + 1) * PAGE, n - hole - 1)], memory)
    assert len(whole) >= 16
    assert len(whole - holed) <= 4, "chunks lost: the one with the hole, and those before the cuts are back in step"
    assert len(holed - whole) <= 5, "chunks new: the same, split at the hole"


def test_chunks_of_random_memory_are_about_four_mib() -> None:
    n = (128 << 20) // PAGE
    image = b"".join(_pages(n, 3))
    spans = _cut(image, [(0x7F0000000000, n)])
    sizes = [length for _, length in spans]
    assert all(MIN_CHUNK <= size <= MAX_PAGE_CHUNK for size in sizes[:-1])
    assert 2 << 20 <= len(image) / len(spans) <= 4 << 20


def test_the_small_runs_after_a_large_one_begin_a_chunk_of_their_own() -> None:
    """A lazy restore brings back the small (eager) runs first: they must not share a chunk
    with the tail of the large lazy run before them."""
    big = (9 << 20) // PAGE + 5
    runs = [(0x7F0000000000, big), (0x7FF000000000, 3), (0x7FF100000000, 2)]
    spans = _cut(b"".join(_pages(big + 5, 9)), runs)
    assert spans[-1] == (big * PAGE, 5 * PAGE)


def test_cuts_do_not_depend_on_how_much_is_fingerprinted_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    n = (48 << 20) // PAGE
    image = b"".join(_pages(n, 5))
    runs = [(0x10000, 3), (0x7F0000000000, n - 3)]
    whole = _cut(image, runs)
    for segment in (PAGE, 1 << 20, 5 << 20):
        monkeypatch.setattr(chunking, "SEGMENT", segment)
        assert _cut(image, runs) == whole


def test_zero_pages_are_cut_into_equal_chunks() -> None:
    image = bytes(20 << 20)
    spans = _cut(image, [(0x7F0000000000, len(image) // PAGE)])
    assert [n for _, n in spans] == [MAX_PAGE_CHUNK] * 5


def test_the_fingerprint_folds_two_words_of_each_page() -> None:
    """A page is marked by bytes 520-527 and 1544-1551 only: a change elsewhere in it does
    not move a cut."""
    page = bytearray(PAGE)
    page[520:528] = bytes([0x5C, 0, 0, 0, 0, 0, 0, 0])
    page[1544:1552] = bytes([1, 2, 0, 0, 0, 0, 0, 0])  # folds to 3, below the threshold
    other = bytearray(page)
    other[0:520] = os.urandom(520)
    other[2000:] = os.urandom(PAGE - 2000)
    image = bytes(PAGE) * 5 + bytes(page) + bytes(PAGE) * 3 + bytes(other)
    assert chunking.marked_pages(memoryview(image)) == [5, 9]
    page[1544] = 0xF0
    assert chunking.marked_pages(memoryview(bytes(page))) == []


def test_fixed_offsets_would_have_changed_everything() -> None:
    """The reason for cutting by address: the same shift at fixed offsets changes every chunk."""
    image = os.urandom(16 << 20)
    a = {blake3.blake3(image[at : at + n]).hexdigest() for at, n in chunking.fixed(len(image), 1 << 20)}
    shifted = os.urandom(PAGE) + image
    b = {blake3.blake3(shifted[at : at + n]).hexdigest() for at, n in chunking.fixed(len(shifted), 1 << 20)}
    assert not a & b


def test_the_same_bytes_at_another_address_cut_the_same() -> None:
    """Two processes holding the same data at randomised addresses (ASLR) share its chunks."""
    data = _pages((16 << 20) // PAGE, 7)
    libs = 0x7F1000000000
    a_base, b_base = 0x7F0000000000 + 37 * PAGE, 0x7E0000000000 + 911 * PAGE
    memory = {a_base + i * PAGE: d for i, d in enumerate(data)} | {b_base + i * PAGE: d for i, d in enumerate(data)}
    memory |= {libs + i * PAGE: os.urandom(PAGE) for i in range(5)}
    a = _chunk_digests([(a_base, len(data)), (libs, 5)], memory)
    b = _chunk_digests([(b_base, len(data)), (libs, 5)], memory)
    assert len(a & b) == len(a) == len(b)


def test_small_runs_are_gathered_and_a_large_run_begins_a_chunk() -> None:
    runs = [(0x10000 + i * ANCHOR_RUN, 1) for i in range(600)] + [(0x7F0000000000, (16 << 20) // PAGE + 3)]
    image = b"".join(_pages(600 + (16 << 20) // PAGE + 3, 4))
    spans = _cut(image, runs)
    assert (600 * PAGE) in {at for at, _ in spans}, "the large run begins a chunk"
    small = [n for at, n in spans if at < 600 * PAGE]
    assert all(n >= MIN_CHUNK for n in small[:-1])


def test_a_page_image_whose_pagemap_does_not_add_up_is_cut_at_fixed_offsets() -> None:
    n = (24 << 20) // PAGE
    runs = {3: [(0x400000, n)]}
    image = b"".join(_pages(n + 1, 8))
    ten, eleven = memoryview(image[: n * PAGE]), memoryview(image)
    assert list(chunking.by_content(ten, runs[3])) != chunking.fixed(n * PAGE)
    assert list(chunking.cutter("pages-3.img", runs)(ten)) == list(chunking.by_content(ten, runs[3]))
    assert list(chunking.cutter("pages-3.img", runs)(eleven)) == chunking.fixed((n + 1) * PAGE)
    assert list(chunking.cutter("pages-4.img", runs)(ten)) == chunking.fixed(n * PAGE)
    assert list(chunking.cutter("core-1.img", runs)(ten)) == chunking.fixed(n * PAGE)


def test_page_runs_reads_every_pagemap_of_a_folder_and_skips_bad_ones(tmp_path: os.PathLike[str]) -> None:
    folder = str(tmp_path)
    with open(os.path.join(folder, "pagemap-1.img"), "wb") as f:
        f.write(_pagemap(1, [(0x400000, 2, 4)]))
    with open(os.path.join(folder, "pagemap-2.img"), "wb") as f:
        f.write(b"not a pagemap")
    assert chunking.page_runs(folder) == {1: [(0x400000, 2)]}


def test_a_shared_memory_segments_pagemap_cuts_its_page_image_by_content(tmp_path: os.PathLike[str]) -> None:
    """CRIU names it after the segment (pagemap-shmem-<id>); no mm image splits its runs, not
    even a process's whose pid equals the segment's id."""
    folder = str(tmp_path)
    with open(os.path.join(folder, "pagemap-shmem-77.img"), "wb") as f:
        f.write(_pagemap(2, [(0x0, 3000, 4)]))
    with open(os.path.join(folder, "mm-77.img"), "wb") as f:
        f.write(_mm([(0x0, 0x1000), (0x1000, 3000 * PAGE)]))
    assert chunking.page_runs(folder) == {2: [(0x0, 3000)]}


def test_entries_split_anywhere_within_a_run_cut_the_same() -> None:
    """CRIU ends a pagemap entry where a pipe buffer fills up, which moves between dumps."""
    present = 4
    base = 0x7F0000000000
    one = _pagemap(1, [(0x400000, 3, present), (base, 1000, present), (base + 1000 * PAGE, 3000, present)])
    two = _pagemap(1, [(0x400000, 3, present), (base, 2500, present), (base + 2500 * PAGE, 1500, present)])
    assert chunking.parse_pagemap(one) == chunking.parse_pagemap(two) == (1, [(0x400000, 3), (base, 4000)])


def _field_bytes(number: int, body: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(body)) + body


def _mm(vmas: list[tuple[int, int]]) -> bytes:
    body = _varint(1 << 3) + _varint(0x400000)  # mm_start_code
    body += _varint(16 << 3 | 1) + bytes(8)  # a fixed-width field, skipped
    for start, end in vmas:
        body += _field_bytes(14, _varint(1 << 3) + _varint(start) + _varint(2 << 3) + _varint(end))
    return struct.pack("<III", 0x54564319, 0x57492820, len(body)) + body


def test_runs_are_cut_where_a_mapping_begins() -> None:
    """A thread's stack right below a buffer: how many of its pages are present changes from
    dump to dump; cut at the buffer's mapping, the buffer's chunks stay where they were."""
    stack, buf = 0x7F0000000000, 0x7F0000100000
    starts = chunking.vma_starts(_mm([(buf, buf + (64 << 20)), (stack, buf), (0x400000, 0x401000)]))
    assert starts == [0x400000, stack, buf]
    one = chunking.split_at([(buf - 2 * PAGE, 2 + 1000)], starts)
    two = chunking.split_at([(buf - 5 * PAGE, 5 + 1000)], starts)
    assert one[1:] == two[1:] == [(buf, 1000)]
    assert one[0] == (buf - 2 * PAGE, 2) and two[0] == (buf - 5 * PAGE, 5)
    assert chunking.split_at([(0x400000, 1), (buf, 10)], starts) == [(0x400000, 1), (buf, 10)]


@pytest.mark.parametrize("data", [b"", struct.pack("<II", 0x54564319, 0x56084025) + bytes(4), _mm([(1, 2)])])
def test_a_bad_mm_image_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        chunking.vma_starts(data)
