"""A stored file written once to the device: O_DIRECT where the filesystem takes it.

Through the page cache, a checkpoint costs a copy into freshly allocated cache pages,
pushes out the node's useful cache, and is durable only after fsync writes it all again;
direct writes go to the device once. Blocks must be aligned, so bytes gather in a
page-aligned buffer, the last block goes out padded and the file is then cut to its
length. Filesystems without O_DIRECT get ordinary writes.
"""

from __future__ import annotations

import errno
import mmap
import os

_ALIGN = 4096  # O_DIRECT wants block-aligned addresses, offsets and lengths
_STAGE = 8 << 20


class DirectOutput:
    """A stored file being written, with O_DIRECT where the filesystem takes it."""

    def __init__(self, path: str, *, direct: bool = True) -> None:
        # O_NOFOLLOW: a link planted in a staging folder of a shared store is not written through.
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        self._buffer: mmap.mmap | None = None
        if direct:
            buffer = mmap.mmap(-1, _STAGE)  # first: a failure here must not leave a descriptor open
            try:
                self.fd = os.open(path, flags | os.O_DIRECT, 0o600)
                self._buffer = buffer
            except OSError as exc:
                buffer.close()
                if exc.errno != errno.EINVAL:
                    raise
        if self._buffer is None:
            self.fd = os.open(path, flags, 0o600)
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
            n = min(len(view), _STAGE - self._filled)
            self._buffer[self._filled : self._filled + n] = view[:n]
            self._filled += n
            view = view[n:]
            if self._filled == _STAGE:
                self._flush(_STAGE)

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
        if self._buffer is not None:
            self._buffer.close()
        os.close(self.fd)


def _write_all(fd: int, view: memoryview) -> None:
    # Each slice is released even when the write fails (a full disk): a slice left alive in
    # the traceback would keep the staging buffer's mapping from being closed.
    done = 0
    while done < len(view):
        with view[done:] as rest:
            done += os.write(fd, rest)
