"""The ttrpc server the fuzz tests attack, its log, and the descriptors and memory it holds."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator

from hotrestart.api.containerd.task.v2 import shim_pb2 as task
from hotrestart.ttrpc.client import Client
from hotrestart.ttrpc.limits import Limits
from hotrestart.ttrpc.server import CallContext, Server, unary

SERVICE = "fuzz.v1.Fuzz"
# Short, so that stalled writers are cut within a round; long enough for a byte-at-a-time
# writer of a small frame while the event loop is busy with everyone else.
FRAME_TIMEOUT = 2.0


async def _state(r: task.StateRequest, ctx: CallContext) -> task.StateResponse:
    return task.StateResponse(id=r.id, pid=len(ctx.metadata))


async def _echo(payload: bytes, ctx: CallContext) -> bytes:
    return payload


async def _decode(payload: bytes, ctx: CallContext) -> bytes:
    return task.StateRequest.FromString(payload).SerializeToString()


async def _yield(payload: bytes, ctx: CallContext) -> bytes:
    await asyncio.sleep(0)
    return payload[:16]


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def settled_rss() -> int:
    """RSS with garbage collected and free heap handed back, so that what is left is in use."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss()


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Failures(logging.Handler):
    """Keeps the server's log out of pytest's capture (memory) while counting what matters."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.errors: list[str] = []
        self.warnings = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR:
            self.errors.append(self.format(record))
        elif record.levelno >= logging.WARNING:
            self.warnings += 1


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def start_server(path: str) -> Server:
    """A server on a Unix socket at `path`, serving the fuzz service."""
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(path)
    sock.listen(256)
    server = Server(Limits(frame_timeout=FRAME_TIMEOUT))
    server.register(
        SERVICE,
        {"State": unary(task.StateRequest, _state), "Echo": _echo, "Decode": _decode, "Yield": _yield},
    )
    await server.serve_socket(sock)
    return server


@contextlib.contextmanager
def quiet_server_log() -> Iterator[Failures]:
    """The server's log counted instead of captured, for the duration."""
    logger = logging.getLogger("hotrestart.ttrpc.server")
    handler = Failures()
    saved = logger.propagate, logger.level
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.WARNING)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.propagate, logger.level = saved


async def still_serving(path: str, server: Server) -> None:
    """A fresh client is answered, and then every connection is gone with nothing in flight."""
    client = await Client.connect(path)
    reply = await client.call(SERVICE, "State", task.StateRequest(id="after"), timeout=2)
    assert task.StateResponse.FromString(reply).id == "after"
    await client.close()
    await until(lambda: server.connection_count == 0 and server.requests_in_flight == 0)
