"""A container's chain of dumps under memory tracking: a dump holding only what changed is
published whole, and becomes the next parent only when nothing came between."""

from __future__ import annotations

import os
import time
from pathlib import Path

from criuimages import plain_task

from hotrestart.checkpoint.dump import secure_parent
from hotrestart.checkpoint.dumped import Dumped
from hotrestart.checkpoint.publish import Publisher
from hotrestart.checkpoint.storecalls import StoreCalls
from hotrestart.checkpoint.tracking import Link, Tracking
from hotrestart.store import pagemap
from hotrestart.store.entry import Entry as StoreEntry
from hotrestart.store.manifest import Identity, Manifest
from hotrestart.store.pagemap import PAGE, PE_PARENT, PE_PRESENT, Entry, Pagemap
from hotrestart.store.store import Store

IDENT = Identity("ns", "pod", "app")
# CRIU's inventory of a dump with tracking on; only kept and handed back, never read here.
INVENTORY = b"inventory with the dump's uptime"


def page(tag: str, vaddr: int) -> bytes:
    return f"{tag}@{vaddr:#x}".encode().ljust(PAGE, b".")


def _dump(store: Store, tmp: Path, tracking: Tracking, pm: Pagemap, tag: str, *, link: Link | None = None) -> Dumped:
    """What dump.dump hands the publisher: CRIU's images of one task in a work folder."""
    cid, staging = store.new_staging()
    work = tmp / f"work-{cid}"
    images = work / "images"
    images.mkdir(parents=True)
    (images / "pagemap-1.img").write_bytes(pagemap.write(pm))
    pages = b"".join(page(tag, e.vaddr + i * PAGE) for e in pm.present for i in range(e.pages))
    (images / f"pages-{pm.pages_id}.img").write_bytes(pages)
    (images / "inventory.img").write_bytes(INVENTORY)
    plain_task(images)
    if link is None:
        link = tracking.begin(str(work))
    files = [(str(images / n), f"images/{n}.zst") for n in sorted(os.listdir(images))]
    manifest = Manifest(
        id=cid,
        identity=IDENT,
        created_at=time.time(),
        node="n1",
        reason="periodic",
        image="img",
        spec_digest="d",
        runtime={},
        network={},
        files=[],
        timings={},
    )
    writer = None
    if link.parent is not None:
        writer, link = secure_parent(store, staging, link)
    return Dumped(
        cid, staging, str(work), False, files, manifest, time.monotonic(), str(images), None, tracking, link, writer
    )


def _work(tmp: Path, name: str) -> str:
    work = tmp / name
    work.mkdir()
    return str(work)


async def _publish(store: Store, dumped: Dumped) -> StoreEntry | None:
    publisher = Publisher(store, StoreCalls(store))
    publisher.publish_later(dumped)
    await publisher.drain(60)
    return store.latest(IDENT)


def _pages(store: Store, entry: StoreEntry, pages_id: int, tmp: Path) -> bytes:
    out = tmp / f"restored-{entry.id}"
    store.restore_file(entry, f"images/pages-{pages_id}.img.zst", str(out))
    return out.read_bytes()


FULL = Pagemap(3, (Entry(0x10000, 4, PE_PRESENT), Entry(0x40000, 2, PE_PRESENT)))
# Since FULL: one page rewritten, one new run; the rest is in the parent.
DELTA = Pagemap(
    5,
    (
        Entry(0x10000, 2, PE_PARENT),
        Entry(0x12000, 1, PE_PRESENT),
        Entry(0x13000, 1, PE_PARENT),
        Entry(0x40000, 2, PE_PARENT),
        Entry(0x90000, 1, PE_PRESENT),
    ),
)


async def test_a_dump_of_what_changed_is_stored_whole_and_the_chain_goes_on(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    tracking = Tracking(str(tmp_path / "track"))
    first = await _publish(store, _dump(store, tmp_path, tracking, FULL, "first"))
    assert first is not None
    work = _work(tmp_path, "w")
    link = tracking.begin(work)
    # The dump's own copy of its parent, in its work folder, given to runc relative to the images.
    assert link.parent is not None and link.parent.entry.id == first.id and link.parent.maps == f"{work}/parent-maps"
    assert sorted(os.listdir(link.parent.maps)) == ["inventory.img", "pagemap-1.img"]
    assert link.parent_path(f"{work}/images") == "../parent-maps"

    dumped = _dump(store, tmp_path, tracking, DELTA, "second", link=link)
    tracking_folder = sorted(os.listdir(tmp_path / "track"))
    second = await _publish(store, dumped)
    assert second is not None and second.id != first.id and second.manifest is not None
    names = sorted(f.path for f in second.manifest.files)
    assert names == [f"images/{n}.img.zst" for n in ("core-1", "inventory", "mm-1", "pagemap-1", "pages-5")]
    want = [page("first", 0x10000), page("first", 0x11000), page("second", 0x12000), page("first", 0x13000)]
    want += [page("first", 0x40000), page("first", 0x41000), page("second", 0x90000)]
    assert _pages(store, second, 5, tmp_path) == b"".join(want)
    out = tmp_path / "pagemap"
    store.restore_file(second, "images/pagemap-1.img.zst", str(out))
    assert pagemap.read(out.read_bytes()) == Pagemap(
        5, (Entry(0x10000, 4, PE_PRESENT), Entry(0x40000, 2, PE_PRESENT), Entry(0x90000, 1, PE_PRESENT))
    )
    assert store.verify(second) == []
    # The second is the next parent, with its pagemap whole; the first's folder is gone.
    after = tracking.begin(_work(tmp_path, "w2"))
    assert after.parent is not None and after.parent.entry.id == second.id
    assert pagemap.read((Path(after.parent.maps) / "pagemap-1.img").read_bytes()).has_parent_pages is False
    kept = os.listdir(tmp_path / "track")
    assert len(kept) == 1 and kept != tracking_folder, "the first's folder made way for the second's"
    tracking.close()
    assert not (tmp_path / "track").exists()


async def test_a_dump_that_began_later_keeps_an_earlier_one_from_becoming_the_parent(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    tracking = Tracking(str(tmp_path / "track"))
    earlier = _dump(store, tmp_path, tracking, FULL, "first")
    later = tracking.begin(_work(tmp_path, "w"))  # a stop's dump, say, began while the first was being published
    assert later.parent is None
    assert await _publish(store, earlier) is not None
    assert tracking.begin(_work(tmp_path, "w2")).parent is None, "the later dump cleared the tracking"


async def test_a_dump_that_cannot_be_made_whole_is_not_published_and_ends_the_chain(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    tracking = Tracking(str(tmp_path / "track"))
    first = await _publish(store, _dump(store, tmp_path, tracking, FULL, "first"))
    assert first is not None
    link = tracking.begin(_work(tmp_path, "w"))
    beyond = Pagemap(5, (Entry(0x10000, 1, PE_PRESENT), Entry(0x80000, 1, PE_PARENT)))  # not in the parent
    assert await _publish(store, _dump(store, tmp_path, tracking, beyond, "second", link=link)) == first
    assert tracking.begin(_work(tmp_path, "w2")).parent is None
    assert not os.listdir(tmp_path / "store" / "v1" / "staging")


def test_a_first_dump_gets_an_empty_parent_so_that_tracking_is_on(tmp_path: Path) -> None:
    tracking = Tracking(str(tmp_path / "track"))
    work = _work(tmp_path, "work")
    link = tracking.begin(work)
    assert link.parent is None and link.parent_path(f"{work}/images") == "../parent-maps"
    assert os.listdir(f"{work}/parent-maps") == []


async def test_the_containers_end_during_a_publish_takes_nothing_the_publish_needs(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    tracking = Tracking(str(tmp_path / "track"))
    assert await _publish(store, _dump(store, tmp_path, tracking, FULL, "first")) is not None
    dumped = _dump(store, tmp_path, tracking, DELTA, "second", link=tracking.begin(_work(tmp_path, "w")))
    tracking.close()  # containerd deletes the task right after the stop's exit
    second = await _publish(store, dumped)
    assert second is not None and second.id == dumped.id
    assert not (tmp_path / "track").exists(), "nor is anything kept after the end"


async def test_a_parent_gone_from_the_store_before_the_dump_makes_it_a_whole_one(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    tracking = Tracking(str(tmp_path / "track"))
    first = await _publish(store, _dump(store, tmp_path, tracking, FULL, "first"))
    assert first is not None
    link = tracking.begin(_work(tmp_path, "w"))
    store.remove(first)  # pruned, say, or taken by a restore elsewhere
    _, staging = store.new_staging()
    writer, secured = secure_parent(store, staging, link)
    try:
        assert secured.parent is None and os.listdir(secured.folder) == []
    finally:
        writer.close()
    # The parent's chunks were recorded before it was looked for: a collection keeps them.
    journal = (tmp_path / "store" / "v1" / "staging" / os.path.basename(staging) / "chunks.refs").read_text()
    assert first.manifest is not None
    pinned = {c.digest for f in first.manifest.files if f.path.startswith("images/pages-") for c in f.chunks}
    assert pinned and all(d in journal for d in pinned)
