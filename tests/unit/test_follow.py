"""Storing page images while CRIU writes them: the cuts made on the way are the final ones
but for a large run's two ends, and what was stored is reused, never trusted blindly."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import random
import threading
import time
from pathlib import Path

import pytest
from criuimages import plain_task

from hotrestart.checkpoint.dumped import Dumped
from hotrestart.checkpoint.follow import Followed, Follower
from hotrestart.checkpoint.publish import Publisher
from hotrestart.checkpoint.storecalls import StoreCalls
from hotrestart.store import archive, chunking, pagemap
from hotrestart.store.chunkcodec import Codec
from hotrestart.store.manifest import Identity, Manifest
from hotrestart.store.pagemap import PE_PRESENT, Entry, Pagemap
from hotrestart.store.store import Store

PAGE = chunking.PAGE
VADDR = 0x7F0000000000
IDENT = Identity("ns", "pod", "app")


def memory(mib: int, seed: int) -> bytes:
    """Pages as a process holds them: random halves, zero halves, and a zero stretch."""
    rng = random.Random(seed)
    pages = [rng.randbytes(PAGE // 2) + bytes(PAGE // 2) for _ in range((mib << 20) // PAGE)]
    for i in range(len(pages) // 3, len(pages) // 3 + 300):
        pages[i] = bytes(PAGE)
    return b"".join(pages)


def small_runs(pages: int) -> list[tuple[int, int]]:
    """Runs too short to anchor a chunk."""
    step = chunking.ANCHOR_RUN // PAGE - 1
    return [(VADDR + at * 2 * PAGE, min(step, pages - at)) for at in range(0, pages, step)]


def followed_spans(data: bytes, growth: list[int]) -> tuple[chunking.Following, list[tuple[int, int]]]:
    cuts, spans, at = chunking.Following(), [], 0
    view = memoryview(data)
    for n in growth:
        at = min(len(data), at + n)
        spans += cuts.grown(view[: at // PAGE * PAGE])
    spans += cuts.grown(view)
    return cuts, spans


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_what_is_cut_while_written_is_what_the_whole_image_cuts_without_anchors(seed: int) -> None:
    data = memory(40, seed)
    rng = random.Random(seed)
    _cuts, spans = followed_spans(data, [rng.randrange(1, 3 << 20) for _ in range(60)])
    whole = list(chunking.by_content(memoryview(data), small_runs(len(data) // PAGE)))
    assert len(whole) > 8
    # The last chunk is only known once the image is complete.
    assert spans == whole[: len(spans)] and len(spans) >= len(whole) - 1
    assert all(n <= chunking.MAX_PAGE_CHUNK for _, n in spans)


def test_marks_found_while_following_give_the_same_cuts_with_anchors() -> None:
    data = memory(40, 7)
    pages = len(data) // PAGE
    runs = [(VADDR, 100), (VADDR + 0x10000000, 3000), (VADDR + 0x20000000, pages - 3100)]
    expected = list(chunking.by_content(memoryview(data), runs))
    for upto in (0, 1, 2000, pages // 2, pages):
        cuts, _ = followed_spans(data[: upto * PAGE], [upto * PAGE])
        assert cuts.marked.upto == upto
        assert list(chunking.by_content(memoryview(data), runs, cuts.marked)) == expected


def test_marks_are_taken_as_given_for_the_part_they_cover() -> None:
    """by_content does not look at the pages `marked` covers (they were read once already)."""
    data = memory(12, 9)
    pages = len(data) // PAGE
    marked = chunking.Marked(pages=[], upto=pages)
    spans = list(chunking.by_content(memoryview(data), [(VADDR, pages)], marked))
    assert [n for _, n in spans] == [chunking.MAX_PAGE_CHUNK] * 3


def grow(path: Path, data: bytes, piece: int, pause: float) -> threading.Thread:
    """Write `data` to `path` in pieces, as CRIU writes a page image."""

    def run() -> None:
        with open(path, "ab") as f:
            for at in range(0, len(data), piece):
                f.write(data[at : at + piece])
                f.flush()
                time.sleep(pause)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_page_image_followed_while_written_is_stored_once_and_restores(tmp_path: Path) -> None:
    images = tmp_path / "images"
    store = Store(str(tmp_path / "s"))
    _cid, staging = store.new_staging()
    data = memory(48, 11)
    pages = len(data) // PAGE
    # One run large enough to anchor chunks at both of its ends, as a process's heap would.
    runs = {1: [(VADDR, 200), (VADDR + 0x10000000, 6000), (VADDR + 0x20000000, pages - 6200)]}
    follower = Follower(store, staging, str(images), threads=2).start()
    time.sleep(0.1)  # before CRIU has made the folder
    images.mkdir()
    (images / "pages-1.img").touch()
    grow(images / "pages-1.img", data, 3 << 20, 0.02).join()
    deadline = time.monotonic() + 60
    while follower.stored_bytes < len(data) - chunking.MAX_PAGE_CHUNK and time.monotonic() < deadline:
        time.sleep(0.05)  # all but the last chunk, which only the end of the image decides
    writer, followed = follower.finish()
    assert writer is not None and set(followed) == {"pages-1.img"}
    src = str(images / "pages-1.img")
    marked, stored = followed["pages-1.img"].of(src)
    assert marked is not None and marked.upto == pages
    assert sum(n for _, n in stored) >= len(data) // 2
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            cut = chunking.cutter("pages-1.img", runs, marked)
            fe = writer.store_file(src, "images/pages-1.img.zst", cut, pool, stored)
        writer.finish()
    finally:
        writer.close()
    expected = list(chunking.by_content(memoryview(data), runs[1]))
    assert [c.raw for c in fe.chunks] == [n for _, n in expected]
    offsets = [at for at, _ in expected]
    reused = [c for at, c in zip(offsets, fe.chunks, strict=True) if stored.get((at, c.raw)) == c]
    # Only the chunks after the large run's two ends are cut differently once it is known:
    # the cuts are back in step within a few chunks of each.
    assert len(reused) >= len(fe.chunks) - 8
    archive.restore_file(fe, str(tmp_path / "out"), lambda d, n: store.chunks.read("plain", d, n), Codec())
    assert (tmp_path / "out").read_bytes() == data


def test_what_was_followed_does_not_hold_for_another_or_a_shorter_file(tmp_path: Path) -> None:
    path = tmp_path / "pages-1.img"
    path.write_bytes(bytes(3 * PAGE))
    st = path.stat()
    followed = Followed((st.st_dev, st.st_ino), chunking.Marked([], 2), {(0, 2 * PAGE): object()})  # type: ignore[dict-item]
    assert followed.of(str(path))[0] is not None
    path.write_bytes(bytes(PAGE))  # CRIU wrote it again, shorter
    assert followed.of(str(path)) == (None, {})
    path.unlink()
    path.write_bytes(bytes(3 * PAGE))  # another file of the same name
    if path.stat().st_ino != st.st_ino:
        assert followed.of(str(path)) == (None, {})
    assert followed.of(str(tmp_path / "gone")) == (None, {})


def test_an_abandoned_follower_lets_go_of_its_files_before_the_folder_is_removed(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    store = Store(str(tmp_path / "s"))
    _cid, staging = store.new_staging()
    fds = len(os.listdir("/proc/self/fd"))
    follower = Follower(store, staging, str(images), threads=1).start()
    writing = grow(images / "pages-1.img", memory(24, 3), 1 << 20, 0.01)
    deadline = time.monotonic() + 30
    while follower.stored_bytes == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert follower.stored_bytes > 0
    held: list[tuple[int, bool]] = []
    removed = threading.Event()

    def remove() -> None:
        maps = Path("/proc/self/maps").read_text()
        held.append((len(os.listdir("/proc/self/fd")), str(images / "pages-1.img") in maps))
        removed.set()

    follower.abandon(then=remove)  # does not wait for the batch in hand
    writing.join()
    assert removed.wait(30)
    assert held == [(fds + 1, False)]  # only the writing thread's file is open, nothing mapped
    assert follower.finish() == (None, {})


def test_a_follower_abandoned_while_it_waits_for_a_writer_removes_at_once_and_closes_it_later(tmp_path: Path) -> None:
    closed = threading.Event()
    got = threading.Event()

    class Slow(Store):
        def chunk_writer(self, staging: str):  # type: ignore[no-untyped-def]
            got.wait(10)  # a bucket's writer waiting out a collection
            writer = super().chunk_writer(staging)
            close = writer.close
            writer.close = lambda: (close(), closed.set())  # type: ignore[method-assign]
            return writer

    store = Slow(str(tmp_path / "s"))
    _cid, staging = store.new_staging()
    follower = Follower(store, staging, str(tmp_path / "images"), threads=1).start()
    removed = []
    follower.abandon(then=lambda: removed.append(True))
    assert removed == [True]
    got.set()
    assert closed.wait(10)


def test_a_follower_that_cannot_store_leaves_it_all_to_the_publish(tmp_path: Path) -> None:
    class Broken(Store):
        def chunk_writer(self, staging: str):  # type: ignore[no-untyped-def]
            raise OSError("the store is full")

    images = tmp_path / "images"
    images.mkdir()
    (images / "pages-1.img").write_bytes(memory(4, 5))
    store = Broken(str(tmp_path / "s"))
    _cid, staging = store.new_staging()
    follower = Follower(store, staging, str(images), threads=1).start()
    time.sleep(0.1)
    assert follower.finish() == (None, {})


async def test_a_dump_followed_while_written_publishes_as_one_stored_after_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = memory(24, 13)
    pages = len(data) // PAGE
    pm = Pagemap(1, (Entry(0x400000, 100, PE_PRESENT), Entry(VADDR, pages - 100, PE_PRESENT)))

    def dumped(store: Store, follow: bool) -> Dumped:
        cid, staging = store.new_staging()
        work = tmp_path / f"work-{cid}"
        images = work / "images"
        follower = Follower(store, staging, str(images), threads=2).start() if follow else None
        images.mkdir(parents=True)
        plain_task(images)
        grow(images / "pages-1.img", data, 2 << 20, 0.01).join()
        (images / "pagemap-1.img").write_bytes(pagemap.write(pm))  # CRIU writes it last
        files = [(str(images / n), f"images/{n}.zst") for n in sorted(os.listdir(images))]
        manifest = Manifest(cid, IDENT, time.time(), "n1", "stop", "img", "d", {}, {}, [], {})
        return Dumped(cid, staging, str(work), False, files, manifest, time.monotonic(), str(images), follower=follower)

    entries = []
    for follow in (True, False):
        store = Store(str(tmp_path / f"s-{follow}"))
        publisher = Publisher(store, StoreCalls(store))
        with caplog.at_level(logging.INFO):
            task = publisher.publish_later(dumped(store, follow))
            await publisher.drain(60)
        assert task.done() and task.exception() is None
        entry = store.latest(IDENT)
        assert entry is not None and entry.manifest is not None
        entries.append(entry.manifest)
        store.restore_file(entry, "images/pages-1.img.zst", str(tmp_path / f"out-{follow}"))
        assert (tmp_path / f"out-{follow}").read_bytes() == data
        assert not any(p.name.startswith("work-") for p in tmp_path.iterdir())
    followed, plain = ({f.path: f for f in m.files}["images/pages-1.img.zst"] for m in entries)
    assert followed.digest == plain.digest  # the same chunks, whoever cut them
    # What the checkpoint added: each chunk it uses once, not the ones cut on the way and dropped.
    assert entries[0].new_bytes == entries[1].new_bytes
    said = [r.getMessage() for r in caplog.records if "stored while CRIU wrote them" in r.getMessage()]
    assert len(said) == 1 and int(said[0].split(": ")[1].split()[0]) > 0


def test_a_writer_the_dump_made_already_is_the_one_handed_back(tmp_path: Path) -> None:
    """A dump whose parent was dropped keeps the writer that pinned its chunks: one writer."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "pages-1.img").write_bytes(memory(12, 5))
    store = Store(str(tmp_path / "s"))
    _cid, staging = store.new_staging()
    made = store.chunk_writer(staging)
    follower = Follower(store, staging, str(images), threads=1, writer=made).start()
    deadline = time.monotonic() + 30
    while follower.stored_bytes == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    writer, followed = follower.finish()
    assert writer is made and set(followed) == {"pages-1.img"}
    writer.close()


def test_the_followers_threads_yield_to_criu_and_no_other_thread_does() -> None:
    from hotrestart.checkpoint import follow

    seen: list[int] = []

    def run() -> None:
        follow._yield_to_criu()
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen == [follow.NICE]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) < follow.NICE
