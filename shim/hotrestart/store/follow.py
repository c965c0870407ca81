"""Compressing CRIU's page images while CRIU is still writing them.

CRIU writes a stop-time dump's memory (`pages-*.img`) front to back into the work folder;
compressing each chunk as soon as it is complete, on a core CRIU does not use, leaves only
the last chunk and the small images for after the dump, which is most of the time from
stop to a durable checkpoint.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import threading
from collections.abc import Callable

from hotrestart.store import compress
from hotrestart.store.compress import CHUNK, LEVEL, ChunkSeal, FileCompressor
from hotrestart.store.manifest import FileEntry


class Follower:
    """Compresses files while another process is still appending to them.

    Only for files that are never rewritten behind their end: CRIU's page images are, as
    long as it dumps without a parent image (no pre-dump, no --auto-dedup).
    """

    POLL = 0.02

    def __init__(
        self,
        directory: str,
        dest: str,
        rel_prefix: str,
        *,
        prefix: str = "pages-",
        suffix: str = ".img",
        chunk: int = CHUNK,
        level: int = LEVEL,
        direct: bool = True,
        seal_for: Callable[[str], ChunkSeal] | None = None,
    ) -> None:
        self._dir = directory
        self._dest = dest
        self._rel_prefix = rel_prefix
        self._match = (prefix, suffix)
        self._chunk, self._level, self._direct = chunk, level, direct
        self._seal_for = seal_for  # a file's chunk sealer, asked for when the file is first seen
        self._files: dict[str, FileCompressor] = {}
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="hotrestart-follow", daemon=True)
        self._closed = False

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        # Every core but one (CRIU's); on a two-core node that is this thread alone.
        spare = compress.workers() - 1
        try:
            with concurrent.futures.ThreadPoolExecutor(spare) if spare > 1 else contextlib.nullcontext() as pool:
                while not self._stop.wait(self.POLL):
                    self._step(pool, final=False)
        except BaseException as exc:
            self._error = exc

    def _step(self, pool: concurrent.futures.Executor | None, *, final: bool) -> None:
        try:
            names = sorted(os.listdir(self._dir))
        except FileNotFoundError:
            return  # not created yet
        prefix, suffix = self._match
        for name in names:
            if not (name.startswith(prefix) and name.endswith(suffix)):
                continue
            stored = self._files.get(name)
            if stored is None:
                dst = os.path.join(self._dest, name + ".zst")
                stored = self._files[name] = FileCompressor(
                    os.path.join(self._dir, name),
                    dst,
                    self._rel_prefix + name + ".zst",
                    chunk=self._chunk,
                    level=self._level,
                    direct=self._direct,
                    seal=self._seal_for(self._rel_prefix + name + ".zst") if self._seal_for else None,
                )
            stored.advance(pool, final=final)

    def finish(self) -> dict[str, FileEntry]:
        """Once the writer is done: compress what is left; the entries by raw file path."""
        self._halt()
        try:
            if self._error is not None:
                raise self._error
            with concurrent.futures.ThreadPoolExecutor(compress.workers()) as pool:
                self._step(pool, final=True)
            return {os.path.join(self._dir, name): stored.finish() for name, stored in self._files.items()}
        finally:
            self.close()

    def _halt(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def close(self) -> None:
        """Stop following and release every descriptor (the outputs are left to the caller)."""
        self._halt()
        if not self._closed:
            self._closed = True
            for stored in self._files.values():
                stored.close()
