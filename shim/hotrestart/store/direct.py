"""A stored file written once to the device: O_DIRECT where the filesystem takes it.

Through the page cache, a checkpoint costs a copy into freshly allocated cache pages,
pushes out the node's useful cache, and is durable only after fsync writes it all again;
direct writes go to the device once. Blocks must be aligned, so bytes gather in a
page-aligned buffer, the last block goes out padded and the file is then cut to its
length. Filesystems without O_DIRECT get ordinary writes.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os

_ALIGN = 4096  # O_DIRECT wants block-aligned addresses, offsets and lengths
_STAGE = 8 << 20


class DirectOutput:
    """A stored file being written, with O_DIRECT where the filesystem takes it."""

    def __init__(
        self, path: str, *, dir_fd: int | None = None, direct: bool = True, buffer: mmap.mmap | None = None
    ) -> None:
        """`buffer`: a page-aligned staging buffer (a multiple of 4 KiB) the caller reuses and
        closes; by default one of 8 MiB is made and closed here."""
        # A new file, never one already there: a link or hard link planted in a shared store
        # is not written through.
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        self._buffer: mmap.mmap | None = None
        self._owned = buffer is None
        if direct:
            # First: a failure here must not leave a descriptor open.
            staging = buffer if buffer is not None else mmap.mmap(-1, _STAGE)
            try:
                self.fd = os.open(path, flags | os.O_DIRECT, 0o600, dir_fd=dir_fd)
                self._buffer = staging
            except OSError as exc:
                if self._owned:
                    staging.close()
                if exc.errno != errno.EINVAL:
                    raise
                # The filesystem refused O_DIRECT after creating the file.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path, dir_fd=dir_fd)
        if self._buffer is None:
            self.fd = os.open(path, flags, 0o600, dir_fd=dir_fd)
        self._filled = 0
        self.size = 0

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self._buffer is None:
            with memoryview(data) as whole:
                _write_all(self.fd, whole)
            return
        view = memoryview(data)
        while view:
            n = min(len(view), len(self._buffer) - self._filled)
            self._buffer[self._filled : self._filled + n] = view[:n]
            self._filled += n
            view = view[n:]
            if self._filled == len(self._buffer):
                self._flush(len(self._buffer))

    def _flush(self, length: int) -> None:
        assert self._buffer is not None
        with memoryview(self._buffer) as staged, staged[:length] as chunk:
            _write_all(self.fd, chunk)
        self._filled = 0

    def finish(self) -> None:
        """Write what is left and make the file durable."""
        if self._buffer is not None and self._filled:
            padded = -(-self._filled // _ALIGN) * _ALIGN
            self._buffer[self._filled : padded] = bytes(padded - self._filled)
            self._flush(padded)
            os.ftruncate(self.fd, self.size)
        os.fsync(self.fd)

    def close(self) -> None:
        if self._buffer is not None and self._owned:
            self._buffer.close()
        os.close(self.fd)


def _write_all(fd: int, view: memoryview) -> None:
    # Each slice is released even when the write fails (a full disk): a slice left alive in
    # the traceback would keep the staging buffer's mapping from being closed.
    done = 0
    while done < len(view):
        with view[done:] as rest:
            done += os.write(fd, rest)
