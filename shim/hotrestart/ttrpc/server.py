"""ttrpc server: many concurrent unary calls per connection, errors on the caller's stream.

containerd multiplexes every Task call over one connection and keeps a `Wait` pending while
it sends others, so each request runs as its own task and replies go out as they finish.
A frame that cannot be parsed at all closes that connection only; the shim and its other
connections carry on.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from hotrestart.api.ttrpc import request_pb2
from hotrestart.errors import Code, InvalidArgumentError, status_for
from hotrestart.ttrpc import framing

log = logging.getLogger(__name__)

NAMESPACE_KEY = "containerd-namespace-ttrpc"


@dataclasses.dataclass(frozen=True, slots=True)
class CallContext:
    service: str
    method: str
    metadata: Mapping[str, tuple[str, ...]]

    @property
    def namespace(self) -> str:
        values = self.metadata.get(NAMESPACE_KEY, ())
        return values[0] if values else ""


Handler = Callable[[bytes, CallContext], Awaitable[bytes]]

Req = TypeVar("Req", bound=Message)


def unary(request_type: type[Req], fn: Callable[[Req, CallContext], Awaitable[Message]]) -> Handler:
    """Wrap a typed method as a bytes-in, bytes-out handler; garbage input is InvalidArgument."""

    async def handle(payload: bytes, ctx: CallContext) -> bytes:
        request = request_type()
        try:
            request.ParseFromString(payload)
        except DecodeError as exc:
            raise InvalidArgumentError(f"{ctx.method}: malformed request payload: {exc}") from exc
        reply = await fn(request, ctx)
        return reply.SerializeToString()

    return handle


class Server:
    def __init__(self) -> None:
        self._services: dict[str, dict[str, Handler]] = {}
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._server: asyncio.base_events.Server | None = None

    def register(self, service: str, methods: Mapping[str, Handler]) -> None:
        self._services.setdefault(service, {}).update(methods)

    async def serve_socket(self, sock: socket.socket) -> None:
        self._server = await asyncio.start_unix_server(self._on_connection, sock=sock)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        # Closing the transports ends each connection's read loop; cancelling the handler
        # tasks instead would make asyncio log every one of them as an error.
        for writer in list(self._connections.values()):
            writer.close()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=2.0)

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = writer
        try:
            if not _peer_is_same_user(writer):
                log.warning("refusing ttrpc connection from another user")
                return
            await _Connection(self, reader, writer).run()
        finally:
            self._connections.pop(task, None)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _lookup(self, service: str, method: str) -> Handler:
        methods = self._services.get(service)
        if methods is None:
            raise _Status(Code.UNIMPLEMENTED, f"service {service}")
        handler = methods.get(method)
        if handler is None:
            raise _Status(Code.UNIMPLEMENTED, f"method {method}")
        return handler


class _Status(Exception):
    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Connection:
    def __init__(self, server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._server = server
        self._reader = reader
        self._writer = writer
        self._write_lock = asyncio.Lock()
        self._last_stream = 0
        self._inflight: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        try:
            while True:
                try:
                    frame = await framing.read_frame(self._reader)
                except framing.FrameError as exc:
                    log.warning("closing ttrpc connection: %s", exc)
                    return
                if frame is None:
                    return
                self._accept(frame)
        except (ConnectionError, OSError):
            return
        finally:
            for task in list(self._inflight):
                task.cancel()

    def _accept(self, frame: framing.Frame) -> None:
        if frame.type != framing.MessageType.REQUEST:
            # Streaming data frames (ttrpc 1.2) have no use in the Task API; ignore them
            # as ttrpc does for types it does not handle.
            return
        if frame.oversize:
            self._spawn(
                self._reply_status(
                    frame.stream_id,
                    Code.RESOURCE_EXHAUSTED,
                    f"message length {frame.oversize} exceeds maximum message size of {framing.MAX_PAYLOAD}",
                )
            )
            return
        if frame.stream_id % 2 == 0 or frame.stream_id <= self._last_stream:
            self._spawn(
                self._reply_status(frame.stream_id, Code.INVALID_ARGUMENT, f"invalid stream id {frame.stream_id}")
            )
            return
        self._last_stream = frame.stream_id
        self._spawn(self._handle(frame))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _handle(self, frame: framing.Frame) -> None:
        request = request_pb2.Request()
        try:
            request.ParseFromString(frame.payload)
        except DecodeError as exc:
            await self._reply_status(frame.stream_id, Code.INVALID_ARGUMENT, f"malformed ttrpc request: {exc}")
            return
        metadata: dict[str, tuple[str, ...]] = {}
        for kv in request.metadata:
            metadata[kv.key.lower()] = (*metadata.get(kv.key.lower(), ()), kv.value)
        ctx = CallContext(request.service, request.method, metadata)
        response = request_pb2.Response()
        try:
            handler = self._server._lookup(request.service, request.method)
            if request.timeout_nano > 0:
                async with asyncio.timeout(request.timeout_nano / 1e9):
                    payload = await handler(request.payload, ctx)
            else:
                payload = await handler(request.payload, ctx)
            response.status.code = Code.OK
            response.payload = payload
        except _Status as exc:
            response.status.code = exc.code
            response.status.message = exc.message
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every failure becomes a status, never a dead shim
            code, message = status_for(exc)
            if code == Code.UNKNOWN:
                log.exception("%s/%s failed", request.service, request.method)
            else:
                log.info("%s/%s: %s", request.service, request.method, message)
            response.status.code = code
            response.status.message = message
        await self._send(frame.stream_id, response.SerializeToString())

    async def _reply_status(self, stream_id: int, code: Code, message: str) -> None:
        response = request_pb2.Response()
        response.status.code = code
        response.status.message = message
        await self._send(stream_id, response.SerializeToString())

    async def _send(self, stream_id: int, payload: bytes) -> None:
        try:
            data = framing.encode(stream_id, framing.MessageType.RESPONSE, payload)
        except ValueError as exc:
            response = request_pb2.Response()
            response.status.code = Code.RESOURCE_EXHAUSTED
            response.status.message = str(exc)
            data = framing.encode(stream_id, framing.MessageType.RESPONSE, response.SerializeToString())
        async with self._write_lock:
            try:
                self._writer.write(data)
                await self._writer.drain()
            except (ConnectionError, OSError):
                pass


def _peer_is_same_user(writer: asyncio.StreamWriter) -> bool:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return True
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return True
    _pid, uid, gid = struct.unpack("3i", creds)
    return bool(uid == os.geteuid() and (uid == 0 or gid == os.getegid()))
