"""The long-running shim: serves the Task API for one pod until its last container is gone."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING

from hotrestart import bundle as node_bundle
from hotrestart import telemetry
from hotrestart.events import Publisher, TaskEvents
from hotrestart.handoff import LISTEN_FD_ENV
from hotrestart.reaper import Reaper, become_subreaper
from hotrestart.runtime.command import CommandRunner
from hotrestart.service.task import SERVICES, TaskService
from hotrestart.ttrpc.server import Server
from hotrestart.workload import lookup

if TYPE_CHECKING:
    from hotrestart.shim_main import Flags

log = logging.getLogger("hotrestart")


class _FifoHandler(logging.Handler):
    """Writes to the bundle's `log` FIFO, which containerd copies into its own log.

    Non-blocking: a containerd that stops reading must never stall the shim; lines are
    dropped instead.
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        self._fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            os.write(self._fd, (self.format(record) + "\n").encode(errors="replace"))
        except OSError:
            pass


def _setup_logging(debug: bool, shim_id: str) -> None:
    handler: logging.Handler
    try:
        handler = _FifoHandler("log")
    except OSError:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"time=%(asctime)s level=%(levelname)s shim=hotrestart id={shim_id} msg=%(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    level = logging.DEBUG if debug else logging.INFO
    if root.level != level:
        # setLevel clears every logger's cache: in a shim forked from the zygote (which set
        # INFO already) that would copy the pages of all of them.
        root.setLevel(level)


def _stop_on_signal(stop: asyncio.Event, sig: int) -> None:
    log.info("received %s; shutting down", signal.Signals(sig).name)
    stop.set()


def serve(flags: Flags) -> None:
    fd = int(os.environ.pop(LISTEN_FD_ENV, "3"))
    serve_socket(flags, socket.socket(fileno=fd))


def serve_socket(flags: Flags, sock: socket.socket) -> None:
    """Serve the Task API on `sock` until shut down, then remove the socket file."""
    _setup_logging(flags.debug, flags.id)
    node_bundle.own_tools_first()
    path = sock.getsockname()
    try:
        asyncio.run(_serve(flags, sock))
    finally:
        sock.close()
        if isinstance(path, str) and path:
            with contextlib.suppress(OSError):
                os.unlink(path)
        # After the socket is gone, so a waiting exporter never delays the pod's next shim.
        telemetry.shutdown()


async def _serve(flags: Flags, sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    try:
        become_subreaper()
    except OSError as exc:
        log.warning("%s", exc)
    reaper = Reaper()
    reaper.install(loop)
    publisher = Publisher(os.environ.get("TTRPC_ADDRESS", ""), flags.namespace)
    stop = asyncio.Event()
    service = TaskService(
        namespace=flags.namespace,
        reaper=reaper,
        events=TaskEvents(publisher),
        on_idle=stop.set,
        pod_labels=functools.partial(
            lookup.pod_labels,
            CommandRunner(reaper),
            flags.address,
            flags.namespace,
            timeout=lookup.lookup_timeout(),
        ),
    )
    server = Server()
    for name in SERVICES:
        server.register(name, service.handlers())
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _stop_on_signal, stop, sig)
    await server.serve_socket(sock)
    log.info("shim serving namespace %s (pid %d)", flags.namespace, os.getpid())
    await stop.wait()
    await service.drain()
    await server.close()
    await publisher.drain(5.0)
    log.info("shim exiting")
