"""Store the page images of a dump that ends the container while CRIU still writes them.

A stop's checkpoint is durable only once every page is hashed and every new chunk is
compressed and in the store; done after the dump, that work adds its whole time to the
dump's. CRIU writes each page image once, from start to end, so what it has written is
final: a follower thread cuts it by content (`chunking.Following`) and stores the chunks
as they come, on part of the cores (CRIU works on the rest), and the publish afterwards
reuses every chunk whose span the final cut (which also knows the pagemap's large runs)
gives again. Only dumps without a parent are followed: an incremental dump's page images
are rewritten when it is made whole. Dumps that leave the container running (periodic, API)
are not followed: there the application is frozen while CRIU works, and that time counts,
not the durable time.

What makes the reuse sound is how CRIU writes a page image: once, in order, never again, in
the shim's private work folder, which nothing else writes. The publish still checks that an
image is the file followed and no shorter than what was read of it.

Nothing here can fail a dump: a follower that cannot go on stops, and the publish stores
what it did not.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import mmap
import os
import re
import stat
import threading
from collections.abc import Callable

from hotrestart.store import chunking
from hotrestart.store.backend import Backend
from hotrestart.store.chunking import Span
from hotrestart.store.chunkwrite import ChunkWriter, workers
from hotrestart.store.manifest import Chunk

log = logging.getLogger(__name__)

POLL = 0.05  # seconds between looks at the images folder
BATCH = 32 << 20  # bytes of one image taken at a time (bounds how long `finish` waits)
THREADS = max(1, workers() // 2)  # CRIU has the other cores
NICE = 10  # the follower's threads' nice value
_PAGES = re.compile(r"pages-[0-9]{1,10}\.img")


@dataclasses.dataclass
class Followed:
    """What was stored of one page image while it was written."""

    inode: tuple[int, int]  # (st_dev, st_ino): the file followed, not one put in its place
    marked: chunking.Marked
    chunks: dict[Span, Chunk] = dataclasses.field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.marked.upto * chunking.PAGE

    def of(self, path: str) -> tuple[chunking.Marked | None, dict[Span, Chunk]]:
        """The marked pages and stored chunks that hold for the file at `path` now: none if
        it is another file or shorter than what was followed (CRIU wrote it again)."""
        try:
            st = os.stat(path, follow_symlinks=False)
        except OSError:
            return None, {}
        if (st.st_dev, st.st_ino) != self.inode or st.st_size < self.size:
            return None, {}
        return self.marked, self.chunks


class Follower:
    """Follows the page images CRIU writes into `images` and stores them in `staging`'s
    writer; `finish` hands the writer and what was stored over to the publish."""

    def __init__(
        self, store: Backend, staging: str, images: str, threads: int = THREADS, writer: ChunkWriter | None = None
    ) -> None:
        self._store = store
        self._staging = staging
        self._images = images
        self._threads = threads
        self._stop = threading.Event()
        self._files: dict[str, tuple[int, chunking.Following, Followed]] = {}  # name -> (fd, cuts, stored)
        self._dir: int | None = None  # the images folder, once CRIU has made it
        self._lock = threading.Lock()  # guards the four below
        self._writer = writer  # the checkpoint's, when the dump made it already
        self._reading = False  # whether the follower may hold files of the work folder (from its first look)
        self._abandoned = False
        self._then: Callable[[], None] | None = None  # what `abandon` left for the follower to run
        self._thread = threading.Thread(target=self._run, name="checkpoint-follower", daemon=True)

    def start(self) -> Follower:
        self._thread.start()
        return self

    def finish(self) -> tuple[ChunkWriter | None, dict[str, Followed]]:
        """Stop following (waiting for the batch in hand); the writer (None if it never got
        one, or could not go on) and, per page image name, what was stored of it. The
        caller closes the writer. Not from the event loop: this waits."""
        self._stop.set()
        self._thread.join()
        with self._lock:
            writer, self._writer = self._writer, None
        if writer is None:
            return None, {}
        return writer, {name: followed for name, (_, _, followed) in self._files.items()}

    def abandon(self, then: Callable[[], None]) -> None:
        """Stop following and throw the writer away without waiting; `then` (the work
        folder's removal) runs once the follower holds none of its files: now, or on the
        follower's thread when it lets go of them."""
        with self._lock:
            self._stop.set()
            self._abandoned = True
            if self._reading:
                self._then = then
                return
            # Not reading, yet or any more: a writer it gets later, it closes itself.
            writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
        then()

    @property
    def stored_bytes(self) -> int:
        """Raw bytes stored so far (read from another thread: copies, not live views)."""
        return sum(c.raw for _, _, f in list(self._files.values()) for c in list(f.chunks.values()))

    def _run(self) -> None:
        writer = None
        try:
            writer = self._writer
            if writer is None:
                # A bucket's writer may first wait out a collection: the dump goes on meanwhile.
                writer = self._store.chunk_writer(self._staging)
            with self._lock:
                self._writer = writer
            _yield_to_criu()
            with concurrent.futures.ThreadPoolExecutor(self._threads, initializer=_yield_to_criu) as pool:
                while not self._stop.is_set():
                    busy = self._look(writer, pool)
                    writer.keepalive()
                    if not busy:
                        self._stop.wait(POLL)
        except Exception as exc:
            # Nothing of this is handed on: the publish stores it all with a writer of its
            # own (this one's lease in a bucket is no longer renewed).
            log.warning("following the dump in %s stopped: %s", self._images, exc)
            with self._lock:
                self._writer = None
            if writer is not None:
                with contextlib.suppress(Exception):
                    writer.close()
        finally:
            self._let_go()

    def _let_go(self) -> None:
        """Close the work folder's files; an abandoned follower also closes its writer and
        runs what `abandon` left to it."""
        for fd in [f for f, _, _ in self._files.values()] + ([self._dir] if self._dir is not None else []):
            with contextlib.suppress(OSError):
                os.close(fd)
        with self._lock:
            self._reading = False
            then, self._then = self._then, None
            left = None
            if self._abandoned:
                left, self._writer = self._writer, None
        if left is not None:
            with contextlib.suppress(Exception):
                left.close()
        if then is not None:
            try:
                then()
            except Exception as exc:
                log.warning("after following the dump in %s: %s", self._images, exc)

    def _look(self, writer: ChunkWriter, pool: concurrent.futures.Executor) -> bool:
        """Take the next batch of every page image that grew; whether any had grown."""
        if self._dir is None:
            with self._lock:
                if self._stop.is_set():  # abandoned: the folder may be going
                    return False
                self._reading = True  # from here on, `abandon` leaves the folder's removal to this thread
            try:
                self._dir = os.open(self._images, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except FileNotFoundError:
                with self._lock:
                    self._reading = False
                return False  # CRIU has not begun
        names = sorted(n for n in os.listdir(self._dir) if _PAGES.fullmatch(n))
        busy = False
        for name in names:
            if self._stop.is_set():
                break
            busy = self._advance(name, writer, pool) or busy
        return busy

    def _advance(self, name: str, writer: ChunkWriter, pool: concurrent.futures.Executor) -> bool:
        if name not in self._files:
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=self._dir)
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise OSError(f"{name} is not a regular file")
            except BaseException:
                os.close(fd)
                raise
            cuts = chunking.Following()
            self._files[name] = (fd, cuts, Followed((st.st_dev, st.st_ino), cuts.marked))
        fd, cuts, followed = self._files[name]
        size = os.fstat(fd).st_size
        upto = min(size // chunking.PAGE * chunking.PAGE, followed.size + BATCH)
        if upto <= followed.size:
            return False
        source = mmap.mmap(fd, upto, prot=mmap.PROT_READ)
        try:
            with memoryview(source) as data:
                spans = cuts.grown(data)
            chunks = writer.store_spans(source, spans, pool)
        finally:
            source.close()
        followed.chunks.update(zip(spans, chunks, strict=True))
        return True


def follow_threads(store: Backend) -> int:
    """Half of the cores for a store on the node (hashing and compressing are the work);
    a bucket's writer threads (the work is waiting on requests, and the threads' low
    priority leaves CRIU the CPU)."""
    return store.io_threads if store.remote else THREADS


def _yield_to_criu() -> None:
    """Lower the calling thread's priority: the dump, which the stop waits for, comes first,
    and the follower takes what CPU it leaves (Linux sets a nice value per thread)."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
