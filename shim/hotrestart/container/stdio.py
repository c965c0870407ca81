"""Process stdio: pipes or a pseudo-terminal between the container and containerd's FIFOs.

The container always gets pipes (or a pty), never containerd's FIFOs themselves: CRIU
restores pipes by re-attaching the new process's stdio (runc's --inherit-fd), which keeps a
restored process writing into the new pod's log. Output pipes (the common case) are spliced
into their FIFOs from the event loop, without blocking it: a reader that stalls (containerd
restarting) parks only its stream until the FIFO is writable again. A thread per stream
would cost each shim about 170 KiB of private memory. Terminals and stdin, which need
reads and writes through Python buffers, are copied in small threads with blocking I/O.
FIFOs are opened read-write for output so a restarting containerd never makes the
container see EPIPE.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import os
import select
import socket
import struct
import tempfile
import termios
import threading
from collections.abc import Callable

from hotrestart.runtime.command import Stdio

threading.stack_size(256 * 1024)

_CHUNK = 64 * 1024
_SPLICES_PER_TURN = 16  # then give the loop back to other work, even under a flood of output


def _close(fd: int | None) -> None:
    if fd is not None and fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)


class _Copier:
    """Tracks copy threads so the exit can be reported only after output reached containerd."""

    def __init__(self) -> None:
        self._pending = 0
        self._lock = threading.Lock()
        self._drained = threading.Event()
        self._drained.set()

    def spawn(self, name: str, target: Callable[[], None], *, count: bool = True) -> None:
        if count:
            with self._lock:
                self._pending += 1
                self._drained.clear()

        def run() -> None:
            try:
                target()
            finally:
                if count:
                    with self._lock:
                        self._pending -= 1
                        if self._pending == 0:
                            self._drained.set()

        threading.Thread(target=run, name=name, daemon=True).start()

    def splice_out(self, src: int, fifo_path: str) -> None:
        """Copy the pipe `src` into the FIFO from the running event loop (see the module doc)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on the loop's thread: a copy thread instead
            self.spawn(f"copy-out {fifo_path}", functools.partial(_copy_out, src, fifo_path, True))
            return
        with self._lock:
            self._pending += 1
            self._drained.clear()
        _Splice(loop, src, fifo_path, self._one_done)

    def _one_done(self) -> None:
        with self._lock:
            self._pending -= 1
            if self._pending == 0:
                self._drained.set()

    async def wait(self, timeout: float) -> bool:
        if self._drained.is_set():
            return True
        return await asyncio.to_thread(self._drained.wait, timeout)


class _Splice:
    """One output stream spliced from the event loop until end of file, then both closed."""

    def __init__(self, loop: asyncio.AbstractEventLoop, src: int, fifo_path: str, done: Callable[[], None]) -> None:
        self._loop = loop
        self._src = src
        self._dst = -1
        self._done = done
        try:
            self._dst = os.open(fifo_path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
            os.set_blocking(src, False)
            loop.add_reader(src, self._pump)
        except OSError:
            self._finish()

    def _pump(self) -> None:
        for _ in range(_SPLICES_PER_TURN):
            try:
                n = os.splice(self._src, self._dst, _CHUNK, flags=os.SPLICE_F_NONBLOCK)
            except BlockingIOError:
                if _readable(self._src):  # data waiting, so the FIFO is full: wait for room
                    self._loop.remove_reader(self._src)
                    self._loop.add_writer(self._dst, self._resume)
                return
            except InterruptedError:
                continue
            except OSError:
                n = 0
            if n == 0:
                self._finish()
                return

    def _resume(self) -> None:
        self._loop.remove_writer(self._dst)
        self._loop.add_reader(self._src, self._pump)
        self._pump()

    def _finish(self) -> None:
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self._src)
        with contextlib.suppress(Exception):
            if self._dst >= 0:
                self._loop.remove_writer(self._dst)
        _close(self._dst)
        _close(self._src)
        self._dst = self._src = -1
        self._done()


def _readable(fd: int) -> bool:
    try:
        return bool(select.select([fd], [], [], 0)[0])
    except (OSError, ValueError):
        return False


def _copy_out(src: int, fifo_path: str, use_splice: bool) -> None:
    """Copy src to the FIFO until end of file, then close both so containerd sees EOF."""
    dst = -1
    try:
        dst = os.open(fifo_path, os.O_RDWR | os.O_CLOEXEC)
        while True:
            try:
                if use_splice:
                    n = os.splice(src, dst, _CHUNK)
                else:
                    data = os.read(src, _CHUNK)
                    n = len(data)
                    view = memoryview(data)
                    while view:
                        view = view[os.write(dst, view) :]
            except InterruptedError:
                continue
            except OSError:  # EIO from a pty whose last slave closed: the end of output
                break
            if n == 0:
                break
    except OSError:
        pass
    finally:
        _close(dst)
        _close(src)


def _copy_in(fifo_path: str, dst: int) -> None:
    src = -1
    try:
        src = os.open(fifo_path, os.O_RDONLY | os.O_CLOEXEC)
        while True:
            data = os.read(src, _CHUNK)
            if not data:
                break
            view = memoryview(data)
            while view:
                view = view[os.write(dst, view) :]
    except OSError:
        pass
    finally:
        _close(src)
        _close(dst)


class ProcessIO:
    """Base: what runc gets, and the copying between it and containerd."""

    def __init__(self) -> None:
        self._copier = _Copier()

    def runc_stdio(self) -> Stdio:
        raise NotImplementedError

    @property
    def console_socket(self) -> str:
        return ""

    async def started(self) -> None:
        """runc has handed the descriptors to the process; drop our copies of its ends."""

    def note(self, text: str) -> None:
        """A line of the shim's own in the container's output (restore outcomes)."""

    def attach(self) -> None:
        """Open the container's stdio now (containerd sees end of file once no one holds it)."""

    def close_stdin(self) -> None:
        """CloseIO: the process sees end of file on stdin."""

    def resize(self, width: int, height: int) -> None:
        from hotrestart.errors import FailedPreconditionError

        raise FailedPreconditionError("process has no terminal")

    async def drained(self, timeout: float = 2.0) -> bool:
        return await self._copier.wait(timeout)

    def close(self) -> None:
        """Release everything still open (after the process exited, or on a failed start)."""


class PipeIO(ProcessIO):
    def __init__(self, stdin: str, stdout: str, stderr: str) -> None:
        super().__init__()
        self._child: list[int] = []
        self._stdin_w: int | None = None
        self._stdin_lock = threading.Lock()
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        self._child.append(null)
        self._fds = Stdio(stdin=null, stdout=null, stderr=null)
        self._plan: list[tuple[str, int, str]] = []
        if stdin:
            r, w = os.pipe2(os.O_CLOEXEC)
            self._child.append(r)
            self._fds.stdin = r
            self._stdin_w = w
            self._plan.append(("in", w, stdin))
        for name, path in (("stdout", stdout), ("stderr", stderr)):
            if not path:
                continue
            r, w = os.pipe2(os.O_CLOEXEC)
            self._child.append(w)
            setattr(self._fds, name, w)
            self._plan.append(("out", r, path))
        self._started_copy = False

    def runc_stdio(self) -> Stdio:
        self._start_copy()
        return self._fds

    def _start_copy(self) -> None:
        if self._started_copy:
            return
        self._started_copy = True
        for kind, fd, path in self._plan:
            if kind == "out":
                self._copier.splice_out(fd, path)
            else:
                self._copier.spawn(f"copy-in {path}", functools.partial(_copy_in, path, fd), count=False)

    def attach(self) -> None:
        self._start_copy()

    def note(self, text: str) -> None:
        self._start_copy()
        fd = self._fds.stdout
        if fd is None or fd == self._child[0]:  # no stdout, or /dev/null
            return
        with contextlib.suppress(OSError):
            os.write(fd, (text + "\n").encode())

    async def started(self) -> None:
        for fd in self._child:
            _close(fd)
        self._child = []

    def close_stdin(self) -> None:
        with self._stdin_lock:
            fd, self._stdin_w = self._stdin_w, None
        # The copy thread owns the write end; closing it makes its next write fail and the
        # process read end of file. A fresh /dev/null dup keeps the number from being reused
        # by an unrelated open while the thread may still touch it.
        if fd is not None:
            null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
            os.dup2(null, fd)
            os.close(null)

    def close(self) -> None:
        for fd in self._child:
            _close(fd)
        self._child = []
        if not self._started_copy:
            for _kind, fd, _path in self._plan:
                _close(fd)


class ConsoleIO(ProcessIO):
    """A terminal: runc sends the pty master over a console socket we listen on."""

    def __init__(self, stdin: str, stdout: str) -> None:
        super().__init__()
        self._stdin = stdin
        self._stdout = stdout
        self._dir = tempfile.mkdtemp(prefix="pty", dir="/run" if os.access("/run", os.W_OK) else None)
        self._path = os.path.join(self._dir, "s")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self._path)
        os.chmod(self._path, 0o600)
        self._listener.listen(1)
        self._listener.setblocking(False)
        self._master: int | None = None
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        self._null = null

    def runc_stdio(self) -> Stdio:
        return Stdio(stdin=self._null, stdout=self._null, stderr=self._null)

    @property
    def console_socket(self) -> str:
        return self._path

    async def receive_master(self, timeout: float = 10.0) -> None:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            conn, _ = await loop.sock_accept(self._listener)
        with conn:
            conn.setblocking(True)
            fds: list[int] = []
            _msg, ancdata, _flags, _addr = await asyncio.to_thread(
                conn.recvmsg, 4096, socket.CMSG_SPACE(struct.calcsize("i"))
            )
            for level, kind, data in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(struct.unpack(f"{len(data) // 4}i", data[: len(data) - len(data) % 4]))
        if not fds:
            raise OSError("runc sent no terminal descriptor on the console socket")
        self._master = fds[0]
        for extra in fds[1:]:
            _close(extra)
        os.set_inheritable(self._master, False)
        if self._stdout:
            out = os.dup(self._master)
            self._copier.spawn("pty-out", lambda: _copy_out(out, self._stdout, False))
        if self._stdin:
            inp = os.dup(self._master)
            self._copier.spawn("pty-in", lambda: _copy_in(self._stdin, inp), count=False)

    async def started(self) -> None:
        self._cleanup_socket()

    def resize(self, width: int, height: int) -> None:
        if self._master is None:
            super().resize(width, height)
            return
        fcntl.ioctl(self._master, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

    def close_stdin(self) -> None:
        # A terminal has no separate stdin to close; send EOF (^D) like runc-v2 does.
        if self._master is not None:
            with contextlib.suppress(OSError):
                os.write(self._master, b"\x04")

    def _cleanup_socket(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.close()
        with contextlib.suppress(OSError):
            os.unlink(self._path)
        with contextlib.suppress(OSError):
            os.rmdir(self._dir)

    def close(self) -> None:
        self._cleanup_socket()
        _close(self._null)
        self._null = -1
        if self._master is not None:
            _close(self._master)
            self._master = None


def open_io(stdin: str, stdout: str, stderr: str, terminal: bool) -> ProcessIO:
    return ConsoleIO(stdin, stdout) if terminal else PipeIO(stdin, stdout, stderr)
