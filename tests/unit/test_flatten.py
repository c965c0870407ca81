"""A dump taken against a parent is made whole before it is stored: the parent's pages put in place."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import pytest
from criuimages import plain_task

from hotrestart.checkpoint import flatten
from hotrestart.checkpoint.lazyrule import LazyRule
from hotrestart.store import pagemap
from hotrestart.store.pagemap import PAGE, PE_LAZY, PE_PARENT, PE_PRESENT, Entry, Pagemap


class Bytes:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.reads: list[tuple[int, int]] = []

    def read(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        return self.data[offset : offset + length]


def page(tag: str, vaddr: int) -> bytes:
    """A page whose bytes say which dump wrote it and for which address."""
    return f"{tag}@{vaddr:#x}".encode().ljust(PAGE, b".")


def image(tag: str, entries: list[Entry]) -> bytes:
    return b"".join(page(tag, e.vaddr + i * PAGE) for e in entries if e.present for i in range(e.pages))


PARENT = Pagemap(
    3,
    (
        Entry(0x10000, 4, PE_PRESENT),
        Entry(0x14000, 2, PE_PRESENT | PE_LAZY),  # continues the run above, as CRIU may cut it
        Entry(0x40000, 2, PE_PRESENT | PE_LAZY),
    ),
)


def test_the_parents_pages_go_where_the_child_says_in_address_order() -> None:
    child = Pagemap(
        9,
        (
            Entry(0x10000, 1, PE_PRESENT),  # written to since the parent
            Entry(0x11000, 4, PE_PARENT),  # spans two of the parent's entries
            Entry(0x15000, 1, PE_PRESENT | PE_LAZY),
            Entry(0x40000, 2, PE_PARENT),
            Entry(0x90000, 1, PE_PRESENT),  # new since the parent
        ),
    )
    out = io.BytesIO()
    parent_pages = Bytes(image("parent", list(PARENT.entries)))
    # 0x10000-0x18000 is a mapping CRIU may leave to userfaultfd, 0x13000 a thread's stack page.
    rule = LazyRule([(0x10000, 0x18000)], {0x13000})
    whole = flatten.flatten(child, Bytes(image("child", list(child.entries))), PARENT, parent_pages, out, rule)
    assert whole.pages_id == 9 and not whole.has_parent_pages
    want = [page("child", 0x10000)] + [page("parent", 0x11000 + i * PAGE) for i in range(4)] + [page("child", 0x15000)]
    want += [page("parent", 0x40000), page("parent", 0x41000), page("child", 0x90000)]
    assert out.getvalue() == b"".join(want)
    # Pages from the parent are lazy as CRIU would mark them now, not as the parent said;
    # the child's keep their marks; runs that continue one another alike are one entry.
    assert whole.entries == (
        Entry(0x10000, 1, PE_PRESENT),
        Entry(0x11000, 2, PE_PRESENT | PE_LAZY),
        Entry(0x13000, 1, PE_PRESENT),
        Entry(0x14000, 2, PE_PRESENT | PE_LAZY),
        Entry(0x40000, 2, PE_PRESENT),
        Entry(0x90000, 1, PE_PRESENT),
    )
    assert whole.present_bytes == len(out.getvalue())


@pytest.mark.parametrize(
    "entry",
    [Entry(0x20000, 1, PE_PARENT), Entry(0x15000, 2, PE_PARENT), Entry(0xF000, 2, PE_PARENT)],
    ids=["not-in-parent", "runs-past-its-end", "begins-before-it"],
)
def test_a_page_the_parent_does_not_hold_refuses_the_dump(entry: Entry) -> None:
    child = Pagemap(9, (entry,))
    with pytest.raises(ValueError, match="the parent has no page"):
        flatten.flatten(
            child, Bytes(b""), PARENT, Bytes(image("parent", list(PARENT.entries))), io.BytesIO(), LazyRule.none()
        )


def test_a_parent_that_is_not_whole_is_refused() -> None:
    parent = Pagemap(3, (Entry(0x10000, 1, PE_PARENT),))
    with pytest.raises(ValueError, match="not whole"):
        flatten.flatten(
            Pagemap(9, (Entry(0x10000, 1, PE_PARENT),)), Bytes(b""), parent, Bytes(b""), io.BytesIO(), LazyRule.none()
        )


def test_a_short_page_image_is_refused() -> None:
    child = Pagemap(9, (Entry(0x10000, 2, PE_PRESENT),))
    with pytest.raises(ValueError, match="ends short"):
        flatten.flatten(child, Bytes(page("child", 0x10000)), PARENT, Bytes(b""), io.BytesIO(), LazyRule.none())


def test_a_pagemap_image_reads_back_as_written() -> None:
    entries = (Entry(0x1000, 1, PE_PRESENT), Entry(0x2000, 3, PE_PARENT), Entry(1 << 46, 1 << 20, PE_PRESENT | PE_LAZY))
    data = pagemap.write(Pagemap(77, entries))
    assert pagemap.read(data) == Pagemap(77, entries)


@pytest.mark.parametrize(
    "entries",
    [
        [Entry(0x2000, 1, PE_PRESENT), Entry(0x1000, 1, PE_PRESENT)],  # descending
        [Entry(0x1000, 2, PE_PRESENT), Entry(0x2000, 1, PE_PRESENT)],  # overlapping
        [Entry(0x1001, 1, PE_PRESENT)],  # not page-aligned
        [Entry(0x1000, 1, PE_PRESENT | PE_PARENT)],  # both here and in the parent
        [Entry(0x1000, 1, PE_PRESENT | 0x100)],  # a flag this reader does not know
        [Entry((1 << 64) - PAGE, 2, PE_PRESENT)],  # past the end of the address space
    ],
    ids=["descending", "overlapping", "unaligned", "both", "unknown-flag", "past-the-top"],
)
def test_a_pagemap_out_of_shape_is_refused(entries: list[Entry]) -> None:
    with pytest.raises(ValueError):
        pagemap.read(pagemap.write(Pagemap(1, tuple(entries))))


def _parent_pages(name: str, pages_id: int) -> contextlib.AbstractContextManager[Bytes]:
    return contextlib.nullcontext(Bytes(image("parent", list(PARENT.entries))))


def _dump(folder: Path, name: str, pm: Pagemap, pages: bytes | None) -> None:
    folder.mkdir(exist_ok=True)
    plain_task(folder)
    (folder / name).write_bytes(pagemap.write(pm))
    if pages is not None:
        (folder / f"pages-{pm.pages_id}.img").write_bytes(pages)


def test_a_folder_is_made_whole(tmp_path: Path) -> None:
    images, parent_maps = tmp_path / "images", tmp_path / "parent"
    child = Pagemap(1, (Entry(0x10000, 2, PE_PARENT), Entry(0x12000, 1, PE_PRESENT)))
    untouched = Pagemap(2, (Entry(0x5000, 1, PE_PRESENT),))  # a process new since the parent
    _dump(images, "pagemap-1.img", child, image("child", list(child.entries)))
    _dump(images, "pagemap-8.img", untouched, image("new", list(untouched.entries)))
    _dump(parent_maps, "pagemap-1.img", PARENT, None)
    asked = []

    def parent_pages(name: str, pages_id: int) -> contextlib.AbstractContextManager[Bytes]:
        asked.append((name, pages_id))
        return contextlib.nullcontext(Bytes(image("parent", list(PARENT.entries))))

    assert flatten.flatten_images(str(images), str(parent_maps), parent_pages) == 2 * PAGE
    assert asked == [("pagemap-1.img", 3)]
    assert sorted(n for n in os.listdir(images) if n.startswith("pag")) == [
        "pagemap-1.img",
        "pagemap-8.img",
        "pages-1.img",
        "pages-2.img",
    ]
    whole = pagemap.read((images / "pagemap-1.img").read_bytes())
    assert whole.entries == (Entry(0x10000, 3, PE_PRESENT),)
    assert (images / "pages-1.img").read_bytes() == page("parent", 0x10000) + page("parent", 0x11000) + page(
        "child", 0x12000
    )
    assert (images / "pages-2.img").read_bytes() == page("new", 0x5000)


def test_a_folder_that_cannot_be_made_whole_is_left_as_it_was(tmp_path: Path) -> None:
    images, parent_maps = tmp_path / "images", tmp_path / "parent"
    child = Pagemap(1, (Entry(0x12000, 1, PE_PRESENT), Entry(0x80000, 1, PE_PARENT)))
    _dump(images, "pagemap-1.img", child, image("child", list(child.entries)))
    _dump(parent_maps, "pagemap-1.img", PARENT, None)
    before = {p.name: p.read_bytes() for p in images.iterdir()}
    with pytest.raises(ValueError, match="no page at 0x80000"):
        flatten.flatten_images(str(images), str(parent_maps), _parent_pages)
    assert {p.name: p.read_bytes() for p in images.iterdir()} == before
    # No parent pagemap at all: refused the same way.
    (parent_maps / "pagemap-1.img").unlink()
    with pytest.raises(ValueError, match="no parent pagemap"):
        flatten.flatten_images(str(images), str(parent_maps), lambda name, pid: contextlib.nullcontext(Bytes(b"")))


def test_a_child_all_of_whose_pages_are_in_the_parent_needs_no_page_image_of_its_own(tmp_path: Path) -> None:
    images, parent_maps = tmp_path / "images", tmp_path / "parent"
    _dump(images, "pagemap-1.img", Pagemap(4, (Entry(0x40000, 2, PE_PARENT),)), None)
    _dump(parent_maps, "pagemap-1.img", PARENT, None)
    flatten.flatten_images(str(images), str(parent_maps), _parent_pages)
    assert (images / "pages-4.img").read_bytes() == page("parent", 0x40000) + page("parent", 0x41000)


def test_where_the_lazy_marks_cannot_be_told_no_page_stays_lazy() -> None:
    child = Pagemap(9, (Entry(0x10000, 1, PE_PARENT), Entry(0x11000, 1, PE_PRESENT | PE_LAZY)))
    out = io.BytesIO()
    parent_pages = Bytes(image("parent", list(PARENT.entries)))
    whole = flatten.flatten(child, Bytes(page("child", 0x11000)), PARENT, parent_pages, out, LazyRule.none())
    assert whole.entries == (Entry(0x10000, 2, PE_PRESENT),)


def test_a_folder_made_whole_marks_the_parents_pages_lazy_by_the_childs_mappings(tmp_path: Path) -> None:
    images, parent_maps = tmp_path / "images", tmp_path / "parent"
    _dump(images, "pagemap-1.img", Pagemap(4, (Entry(0x10000, 3, PE_PARENT),)), None)
    plain_task(images, lazy=True, sp=0x11008)  # the child's thread has its stack pointer at 0x11008
    _dump(parent_maps, "pagemap-1.img", PARENT, None)
    flatten.flatten_images(str(images), str(parent_maps), _parent_pages)
    whole = pagemap.read((images / "pagemap-1.img").read_bytes())
    assert whole.entries == (
        Entry(0x10000, 1, PE_PRESENT | PE_LAZY),
        Entry(0x11000, 1, PE_PRESENT),
        Entry(0x12000, 1, PE_PRESENT | PE_LAZY),
    )
    # Without the child's mappings there is no telling: the dump is refused.
    (images / "mm-1.img").unlink()
    _dump(images, "pagemap-1.img", Pagemap(4, (Entry(0x10000, 3, PE_PARENT),)), None)
    (images / "mm-1.img").unlink()
    with pytest.raises(ValueError, match="which pages are lazy cannot be told"):
        flatten.flatten_images(str(images), str(parent_maps), _parent_pages)
