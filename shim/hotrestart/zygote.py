"""A preloaded parent that starts pod shims, so a new pod does not pay Python's start-up.

A pod's shim starts on the pod's critical path: `start` must hand containerd an address
that answers at once. Importing the daemon (asyncio, protobuf, the Task service) takes
longer than containerd's whole Go shim needs to start, so a node-wide zygote imports it
once, freezes the heap (`gc.freeze`) and does the `start` work itself: it finds or binds
the pod's socket and double-forks the shim, which is then nobody's child. Forked shims
share the preloaded pages copy-on-write, which also keeps the memory per pod small.

When no zygote answers, `start` launches one for later pods and starts its own shim the
slow way. The zygote socket is a 0600 file, and only callers with our uid are served.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import socket
import struct
import sys

from hotrestart.zygote_client import code_stamp, decode, socket_path

_MAX_REQUEST = 1 << 20


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


def _receive(conn: socket.socket) -> tuple[dict[str, str], dict[str, str]] | None:
    conn.settimeout(5)
    header = conn.recv(4, socket.MSG_WAITALL)
    if len(header) != 4:
        return None
    length = int.from_bytes(header, "big")
    if length > _MAX_REQUEST:
        return None
    body = conn.recv(length, socket.MSG_WAITALL) if length else b""
    if len(body) != length:
        return None
    try:
        return decode(body)
    except UnicodeDecodeError:
        return None


def _same_user(conn: socket.socket) -> bool:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return bool(uid == os.geteuid())


def _start(listener: socket.socket, conn: socket.socket, fields: dict[str, str], env: dict[str, str]) -> str:
    """The `start` verb's work, done here: the address of the pod's (possibly new) shim."""
    from hotrestart import lifecycle

    cwd = fields["cwd"]
    path = lifecycle.socket_path(fields["address"], fields["namespace"], lifecycle.group_id(cwd, fields["id"]))
    address = "unix://" + path
    sock = lifecycle.listen(path)
    if sock is not None:
        _adopt_environment(env)
        try:
            # The caller is answered without waiting for the intermediate child (its own
            # fork takes a few ms): the socket already listens, and the kernel reaps it.
            if os.fork() == 0:
                conn.close()  # the caller waits for end of file on it
                _become_shim(listener, sock, fields, env)
        finally:
            sock.close()
    lifecycle.write_address(cwd, address)
    return address


def _adopt_environment(env: dict[str, str]) -> None:
    """Make our environment `env` before forking a shim, changing only what differs.

    Done in the child, each variable set would copy pages of the shared heap into every
    shim; done here, it is shared, and usually there is nothing to change: containerd
    gives every `start` the same environment."""
    for key in [k for k in os.environ if k not in env]:
        del os.environ[key]
    for key, value in env.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


def _become_shim(listener: socket.socket, sock: socket.socket, fields: dict[str, str], env: dict[str, str]) -> None:
    """In the forked child: detach, adopt the pod's context and serve. Never returns."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the shim reaps its own children
        listener.close()
        os.setsid()
        if os.fork():
            os._exit(0)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.chdir(fields["cwd"])
        from hotrestart.daemon import serve_socket
        from hotrestart.shim_main import Flags

        flags = Flags(
            namespace=fields["namespace"],
            address=fields["address"],
            publish_binary=fields.get("publish_binary", ""),
            id=fields["id"],
            debug=fields.get("debug") == "1",
        )
        serve_socket(flags, sock)
        code = 0
    finally:
        # os._exit skips atexit, where spans still queued would otherwise be exported.
        from hotrestart import telemetry

        telemetry.shutdown()
        os._exit(code)


def _one_malloc_arena() -> None:
    """Keep glibc from giving each stdio thread of a shim its own (mostly private) heap
    arena. The setting is process-wide and survives fork, so it is made once, here."""
    import ctypes

    m_arena_max = -8
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(m_arena_max, 1)


def _immortalize() -> None:
    """Make the preloaded objects immortal (PEP 683), as that PEP foresees for processes that
    fork workers: a child never writes an immortal object's reference count, and each such
    write would copy the page holding the object into the child. With this a shim forked
    from the zygote has about 5.5 MiB of its own instead of 7.8 (CPython 3.13, 10 idle pods).
    The price: preloaded objects are never freed, in the zygote or in a shim, which only
    matters for those dropped later, once each.

    CPython 3.12 and 3.13 release builds with the GIL only, where an object is immortal when
    the low 32 bits of its count (the first word of the object) are all ones; elsewhere
    (CPython 3.11, which the node bundle does not use) nothing is done."""
    if sys.implementation.name != "cpython" or not (3, 12) <= sys.version_info[:2] <= (3, 13):
        return
    if hasattr(sys, "gettotalrefcount") or not getattr(sys, "_is_gil_enabled", lambda: True)():
        return  # a debug build (the count is not the first word) or a free-threaded one
    import ctypes
    import types

    immortal = 0xFFFFFFFF
    pending: list[object] = gc.get_objects()
    while pending:
        obj = pending.pop()
        count = ctypes.c_ssize_t.from_address(id(obj))
        if count.value & 0xFFFFFFFF == immortal:
            continue  # done already, or immortal from the start (and so are its parts)
        count.value = immortal
        pending.extend(gc.get_referents(obj))
        if isinstance(obj, types.CodeType):  # code objects are not tracked: their parts by hand
            pending.extend((obj.co_consts, obj.co_names, obj.co_varnames, obj.co_filename, obj.co_name))
            pending.extend((obj.co_qualname, obj.co_linetable, obj.co_exceptiontable))
        elif isinstance(obj, tuple):
            pending.extend(obj)


class _DiscardEvents:
    def publish(self, topic: str, event: object) -> None:
        pass


async def _exercise() -> None:
    """One pass through what every shim runs: event loop, reaper, a command, a ttrpc call,
    output copied into a FIFO."""
    import asyncio
    import tempfile

    from hotrestart.api.containerd.task.v2 import shim_pb2 as task
    from hotrestart.container.stdio import PipeIO
    from hotrestart.events import TaskEvents
    from hotrestart.reaper import Reaper
    from hotrestart.runtime.command import CommandRunner
    from hotrestart.service.task import SERVICES, TaskService
    from hotrestart.ttrpc.client import Client, StatusError
    from hotrestart.ttrpc.server import NAMESPACE_KEY, Server

    reaper = Reaper()
    reaper.install(asyncio.get_running_loop())
    with contextlib.suppress(OSError):
        await CommandRunner(reaper).run(["true"], timeout=5)
    service = TaskService(namespace="warm-up", reaper=reaper, events=TaskEvents(_DiscardEvents()))
    server = Server()
    server.register(SERVICES[1], service.handlers())
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "s")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        sock.listen(1)
        await server.serve_socket(sock)
        client = await Client.connect(path)
        try:
            meta = {NAMESPACE_KEY: "warm-up"}
            await client.call(SERVICES[1], "Connect", task.ConnectRequest(id="none"), metadata=meta, timeout=5)
            with contextlib.suppress(StatusError):
                await client.call(SERVICES[1], "State", task.StateRequest(id="none"), metadata=meta, timeout=5)
        finally:
            await client.close()
            await server.close()
        fifo = os.path.join(tmp, "out")
        os.mkfifo(fifo, 0o600)
        io = PipeIO("", fifo, "")
        try:
            out = io.runc_stdio().stdout
            assert out is not None
            os.write(out, b"warm-up\n")
            await io.started()  # drops our copy of the write end: the copy sees end of file
            await io.drained(5)
        finally:
            io.close()


def _warm_up() -> None:
    """Run the shim's machinery once before forking any shim.

    First use initialises lazy state (asyncio, subprocess, protobuf, the service's handler
    tables) and specialises bytecode. Done here, every shim shares the result; done in each
    shim, each writes to, and so copies, the pages those objects sit on (about 0.5 MiB per
    shim, measured with smaps).
    """
    import asyncio

    try:
        asyncio.run(_exercise())
    except Exception:  # an optimisation only: each shim does the same work anyway
        pass


def _sweep_work() -> None:
    """Work folders (tmpfs holding process memory) of shims killed before they cleaned up."""
    from hotrestart.checkpoint import workarea

    workarea.sweep_all(workarea.Places.from_env())


def serve(path: str) -> None:
    # Preload everything a shim runs (shim_main too: importing one module in a child costs
    # it about 0.5 MiB of copied pages), then keep the collector from touching (and so
    # copying) the preloaded objects in every child.
    import hotrestart.daemon
    import hotrestart.lifecycle
    import hotrestart.shim_main  # noqa: F401

    # The level every shim logs at (INFO unless -debug), set once here: see _setup_logging.
    logging.getLogger().setLevel(logging.INFO)
    _warm_up()
    _one_malloc_arena()
    _sweep_work()

    stamp = code_stamp()
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
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
    _immortalize()  # before the freeze: frozen objects are no longer listed by the collector
    gc.freeze()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # Children exit at once (they fork the shim and leave); nobody waits for them.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    try:
        while True:
            conn, _ = listener.accept()
            with conn:
                try:
                    if not _same_user(conn):
                        continue
                    request = _receive(conn)
                    if request is None:
                        continue
                    fields, env = request
                    if fields.get("stamp") != stamp:
                        # The package changed under us: decline, and make room for a fresh zygote.
                        conn.sendall(b"stale")
                        return
                    try:
                        reply = b"ok " + _start(listener, conn, fields, env).encode()
                    except (OSError, KeyError) as exc:
                        reply = b"err " + str(exc).encode()
                    conn.sendall(reply)
                except OSError:
                    continue
    finally:
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == inode:
                os.unlink(path)
        listener.close()


if __name__ == "__main__":
    serve(sys.argv[1] if len(sys.argv) > 1 else socket_path())
