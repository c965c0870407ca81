"""A preloaded parent that forks pod shims, so a new pod does not pay Python's start-up.

A pod's shim starts on the pod's critical path: `start` must hand containerd an address
that answers at once. Importing the daemon (asyncio, protobuf, the Task service) takes
longer than containerd's whole Go shim needs to start, so a node-wide zygote imports it
once, freezes the heap (`gc.freeze`) and forks one daemon per pod. Forked shims share the
preloaded pages copy-on-write, which is also what keeps the per-pod memory small.

`start` passes the pod's listening socket (SCM_RIGHTS), its flags, working directory and
environment; the zygote double-forks so the shim is not its child, then answers. When no
zygote answers, `start` launches one for later pods and starts this shim directly. The
zygote socket is a 0600 file, and only callers with our uid are served.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import signal
import socket
import struct
import sys

SOCKET_ENV = "HOTRESTART_ZYGOTE_SOCKET"
# "0" turns the zygote off: every pod's shim is then a fresh interpreter.
ENABLE_ENV = "HOTRESTART_ZYGOTE"
DEFAULT_SOCKET = "/run/hotrestart/zygote.sock"
_MAX_REQUEST = 1 << 20


def enabled() -> bool:
    return os.environ.get(ENABLE_ENV, "1") != "0"


def socket_path() -> str:
    return os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


def _stamp() -> str:
    """Identifies the installed code, so an upgraded package never runs in a stale zygote."""
    import hotrestart

    here = os.path.dirname(hotrestart.__file__)
    newest = max(os.stat(os.path.join(here, name)).st_mtime_ns for name in os.listdir(here) if name.endswith(".py"))
    return f"{hotrestart.__version__}:{newest}"


def request_shim(flags: dict[str, object], cwd: str, listen_fd: int) -> bool:
    """Ask a running zygote for a shim on `listen_fd`; False if none is there to ask."""
    path = socket_path()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(5)
    try:
        conn.connect(path)
    except OSError:
        conn.close()
        return False
    with conn:
        body = json.dumps({"flags": flags, "cwd": cwd, "env": dict(os.environ), "stamp": _stamp()}).encode()
        try:
            conn.sendmsg(
                [struct.pack(">I", len(body)), body],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", listen_fd))],
            )
            reply = conn.recv(64)
        except OSError:
            return False
    return reply.startswith(b"ok")


def launch() -> None:
    """Start a zygote in the background (best effort; a concurrent one may win the socket)."""
    import subprocess

    subprocess.Popen(
        [sys.executable, "-m", "hotrestart.zygote", socket_path()],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=dict(os.environ),
    )


@dataclasses.dataclass
class _Request:
    flags: dict[str, object]
    cwd: str
    env: dict[str, str]
    stamp: str
    fd: int


def _receive(conn: socket.socket) -> _Request | None:
    conn.settimeout(5)
    header, ancdata, _flags, _addr = conn.recvmsg(4, socket.CMSG_SPACE(struct.calcsize("i")))
    fds = [
        fd
        for level, kind, data in ancdata
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
        for fd in struct.unpack(f"{len(data) // 4}i", data[: len(data) - len(data) % 4])
    ]
    if len(header) != 4 or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        return None
    (length,) = struct.unpack(">I", header)
    if length > _MAX_REQUEST:
        os.close(fds[0])
        return None
    body = b""
    while len(body) < length:
        chunk = conn.recv(length - len(body))
        if not chunk:
            os.close(fds[0])
            return None
        body += chunk
    try:
        data = json.loads(body)
        return _Request(
            dict(data["flags"]),
            str(data["cwd"]),
            {str(k): str(v) for k, v in data["env"].items()},
            str(data["stamp"]),
            fds[0],
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        os.close(fds[0])
        return None


def _same_user(conn: socket.socket) -> bool:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return bool(uid == os.geteuid())


def _become_shim(listener: socket.socket, conn: socket.socket, req: _Request) -> None:
    """In the forked child: detach, adopt the pod's context and serve. Never returns."""
    try:
        listener.close()
        conn.close()
        os.setsid()
        if os.fork():
            os._exit(0)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.chdir(req.cwd)
        os.environ.clear()
        os.environ.update(req.env)
        from hotrestart.daemon import serve
        from hotrestart.lifecycle import LISTEN_FD_ENV
        from hotrestart.shim_main import Flags

        os.environ[LISTEN_FD_ENV] = str(req.fd)
        flags = Flags(**{k: v for k, v in req.flags.items() if k in Flags.__dataclass_fields__})  # type: ignore[arg-type]
        gc.enable()
        serve(flags)
        code = 0
    except BaseException:
        code = 1
    os._exit(code)


def serve(path: str) -> None:
    # Preload everything a shim runs, then keep the collector from touching (and so
    # copying) the preloaded objects in every child.
    import hotrestart.daemon
    import hotrestart.runtime.stats  # noqa: F401

    stamp = _stamp()
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        listener.bind(path)
    except OSError:
        # Another zygote owns a live socket: leave. A stale file is replaced.
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
            return
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(path)
            listener.bind(path)
        finally:
            probe.close()
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    inode = os.stat(path).st_ino
    listener.listen(64)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    gc.collect()
    gc.freeze()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            conn, _ = listener.accept()
            with conn:
                try:
                    if not _same_user(conn):
                        continue
                    req = _receive(conn)
                except OSError:
                    continue
                if req is None:
                    continue
                if req.stamp != stamp:
                    # The package changed under us: decline, and make room for a fresh zygote.
                    os.close(req.fd)
                    conn.sendall(b"stale")
                    return
                pid = os.fork()
                if pid == 0:
                    _become_shim(listener, conn, req)
                os.close(req.fd)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
                with contextlib.suppress(OSError):
                    conn.sendall(b"ok")
    finally:
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == inode:
                os.unlink(path)
        listener.close()


if __name__ == "__main__":
    serve(sys.argv[1] if len(sys.argv) > 1 else socket_path())
