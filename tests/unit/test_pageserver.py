"""The lazy restore's page source: pagemap layout, CRIU's page-server protocol, the sparse
page image CRIU restores from, and random reads of a stored file."""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
from pathlib import Path

import pytest
from storekit import make_checkpoint, published_entry
from test_chunking import _pagemap

from hotrestart.checkpoint import pageserver
from hotrestart.checkpoint.pageserver import IOV, PAGE, PageServer, PageServerError, Served, fill_eager, task_pages
from hotrestart.store.archive import CorruptChunk
from hotrestart.store.store import Store

PRESENT, LAZY = 4, 2


class Bytes:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.reads: list[tuple[int, int]] = []

    def read(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        return self.data[offset : offset + length]


def _layout() -> tuple[pageserver.TaskPages, bytes]:
    # stack-like eager run, a lazy heap of 3 pages, an eager page, a lazy run of 5 pages
    entries = [
        (0x400000, 2, PRESENT),
        (0x600000, 3, PRESENT | LAZY),
        (0x700000, 1, PRESENT),
        (0x7F00000, 5, PRESENT | LAZY),
    ]
    image = b"".join(bytes([i]) * PAGE for i in range(2 + 3 + 1 + 5))
    return task_pages(_pagemap(9, entries)), image


def test_a_tasks_runs_carry_their_offsets_and_laziness() -> None:
    layout, _ = _layout()
    assert layout.pages_id == 9
    assert [(r.vaddr, r.offset, r.lazy) for r in layout.runs] == [
        (0x400000, 0, False),
        (0x600000, 2 * PAGE, True),
        (0x700000, 5 * PAGE, False),
        (0x7F00000, 6 * PAGE, True),
    ]


def test_the_page_image_holds_only_the_pages_criu_restores_itself(tmp_path: Path) -> None:
    layout, image = _layout()
    dst = tmp_path / "pages-9.img"
    fill_eager(str(dst), len(image), layout, Bytes(image))
    got = dst.read_bytes()
    assert len(got) == len(image)
    assert got[: 2 * PAGE] == image[: 2 * PAGE] and got[5 * PAGE : 6 * PAGE] == image[5 * PAGE : 6 * PAGE]
    assert got[2 * PAGE : 5 * PAGE] == bytes(3 * PAGE), "lazy pages are holes"
    assert os.stat(dst).st_blocks * 512 < len(image), "holes take no space"


def _ask(sock: socket.socket, nr: int, vaddr: int, task: int) -> tuple[int, int, int, int, bytes]:
    sock.sendall(IOV.pack(pageserver.PS_IOV_GET, nr, vaddr, task))
    head = _recv(sock, IOV.size)
    cmd, n, at, dst = IOV.unpack(head)
    return cmd, n, at, dst, _recv(sock, n * PAGE)


def _recv(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        assert part, "server hung up"
        buf += part
    return buf


def _serving(layout: pageserver.TaskPages, image: bytes) -> tuple[socket.socket, threading.Thread, list[BaseException]]:
    ours, theirs = socket.socketpair()
    server = PageServer(ours, {1: Served(layout, Bytes(image))})
    errors: list[BaseException] = []

    def run() -> None:
        try:
            server.serve()
        except BaseException as exc:
            errors.append(exc)
        finally:
            ours.close()

    thread = threading.Thread(target=run)
    thread.start()
    return theirs, thread, errors


def test_the_server_answers_as_criu_expects_and_never_past_a_run() -> None:
    layout, image = _layout()
    daemon, thread, errors = _serving(layout, image)
    try:
        cmd, n, at, dst, data = _ask(daemon, 2, 0x600000 + PAGE, 1)
        assert (cmd, n, at, dst) == (pageserver.PS_IOV_ADD_F | PRESENT << 16, 2, 0x600000 + PAGE, 1)
        assert data == image[3 * PAGE : 5 * PAGE]
        # More than the run holds: only the rest of the run comes back.
        _, n, _, _, data = _ask(daemon, 64, 0x7F00000 + 3 * PAGE, 1)
        assert n == 2 and data == image[9 * PAGE : 11 * PAGE]
        daemon.sendall(IOV.pack(pageserver.PS_IOV_FORCE_CLOSE, 0, 0, 0))
        assert struct.unpack("<i", _recv(daemon, 4)) == (0,)
    finally:
        daemon.close()
        thread.join(5)
    assert not errors


@pytest.mark.parametrize(
    "request_",
    [
        (1, 0x400000, 1),  # eager memory: CRIU restored it, the daemon has no business asking
        (1, 0x500000, 1),  # no memory there at all
        (1, 0x600000, 7),  # a task this restore does not have
        (1, 0x600001, 1),  # not page-aligned
        (0, 0x600000, 1),  # nothing
    ],
)
def test_anything_but_lazy_memory_of_a_known_task_ends_serving(request_: tuple[int, int, int]) -> None:
    layout, image = _layout()
    daemon, thread, errors = _serving(layout, image)
    try:
        daemon.sendall(IOV.pack(pageserver.PS_IOV_GET, *request_))
        assert daemon.recv(1) == b"", "nothing is served"
    finally:
        daemon.close()
        thread.join(5)
    assert len(errors) == 1 and isinstance(errors[0], PageServerError)


def test_a_daemon_hanging_up_mid_request_is_an_error() -> None:
    layout, image = _layout()
    daemon, thread, errors = _serving(layout, image)
    daemon.sendall(IOV.pack(pageserver.PS_IOV_GET, 1, 0x600000, 1)[:10])
    daemon.close()
    thread.join(5)
    assert len(errors) == 1 and isinstance(errors[0], PageServerError)


def test_random_reads_of_a_stored_file_match_it(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    payload = random.Random(3).randbytes(11 << 20)  # three chunks, the last one short
    make_checkpoint(store, tmp_path, payload)
    entry = published_entry(store)
    reader = store.file_reader(entry, "images/pages.img.zst")
    try:
        rng = random.Random(4)
        for _ in range(50):
            at = rng.randrange(len(payload))
            n = rng.randrange(min(9 << 20, len(payload) - at) + 1)
            assert reader.read(at, n) == payload[at : at + n]
        with pytest.raises(Exception, match="beyond the file"):
            reader.read(len(payload) - 1, 2)
    finally:
        reader.close()


def test_a_corrupt_chunk_fails_the_read_and_leaves_the_store(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    payload = random.Random(5).randbytes(9 << 20)
    make_checkpoint(store, tmp_path, payload)
    entry = published_entry(store)
    assert entry.manifest is not None
    second = entry.manifest.files[0].chunks[1]
    chunk_file = tmp_path / "store" / "v1" / "chunks" / entry.manifest.space / second.digest[:2] / second.digest
    data = bytearray(chunk_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk_file.chmod(0o600)
    chunk_file.write_bytes(bytes(data))
    reader = store.file_reader(entry, "images/pages.img.zst")
    try:
        assert reader.read(0, 4096) == payload[:4096]
        with pytest.raises(CorruptChunk):
            reader.read(5 << 20, 4096)
    finally:
        reader.close()
    assert not chunk_file.exists(), "a corrupt chunk is removed, so no later checkpoint reuses it"
