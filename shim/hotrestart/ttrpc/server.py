"""ttrpc server: many concurrent unary calls per connection, errors on the caller's stream.

containerd multiplexes every Task call over one connection and keeps a `Wait` pending while
it sends others, so each request runs as its own task and replies go out as they finish.

The socket is containerd's alone (0600, same user), but the shim is root on every node, so
no peer can stall the event loop or grow memory without bound. The caps live in `limits`:

- A frame over `MAX_PAYLOAD` is read past and answered ResourceExhausted. A frame that
  cannot be parsed at all (torn, or not completed within `FRAME_TIMEOUT` of its first byte)
  closes that connection only; the shim and its other connections carry on.
- A request that does not decode, or whose metadata is over `MAX_METADATA_ENTRIES` or
  `MAX_METADATA_BYTES`, is InvalidArgument; so is any protobuf decode error from a handler.
- At `MAX_INFLIGHT` requests or `MAX_INFLIGHT_BYTES` unanswered on a connection, the server
  stops reading it. Replies wait for the peer to read (drain above `WRITE_HIGH_WATER`), so a
  peer that never reads stalls its own connection and holds bounded memory.
- Connections over `MAX_CONNECTIONS` are closed at once, with a (rate-limited) log line.

There is deliberately no idle timeout between frames. containerd reads the loss of its
connection as the shim dying: it logs "shim disconnected", runs the shim's `delete` (which
kills the container) and forgets the task. Its connection is legitimately quiet for hours,
with a `Wait` pending or with nothing in flight (an exited container the kubelet keeps for
its logs), so no inactivity rule can tell it from an idle hostile peer. An idle connection
costs one descriptor and a few KiB, and `MAX_CONNECTIONS` bounds how many there are.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from hotrestart.api.ttrpc import request_pb2
from hotrestart.errors import Code, InvalidArgumentError, UnimplementedError, status_for
from hotrestart.ttrpc import framing
from hotrestart.ttrpc.limits import Limits

log = logging.getLogger(__name__)

NAMESPACE_KEY = "containerd-namespace-ttrpc"

# How often a connection stalled at its in-flight cap looks for its peer having gone.
_EOF_POLL = 1.0
# Seconds between two log lines about refused connections.
_REFUSAL_LOG_INTERVAL = 10.0
# Peer-chosen names are cut to this length in replies and logs.
_NAME_ECHO = 256


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
    def __init__(self, limits: Limits | None = None) -> None:
        self._limits = limits or Limits()
        self._services: dict[str, dict[str, Handler]] = {}
        self._connections: dict[asyncio.Task[None], _Connection] = {}
        self._server: asyncio.base_events.Server | None = None
        self._refused = 0
        self._refusal_logged_at: float | None = None

    def register(self, service: str, methods: Mapping[str, Handler]) -> None:
        self._services.setdefault(service, {}).update(methods)

    async def serve_socket(self, sock: socket.socket) -> None:
        self._server = await asyncio.start_unix_server(self._on_connection, sock=sock)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        # Closing the transports ends each connection's read loop; cancelling the handler
        # tasks instead would make asyncio log every one of them as an error. A peer that
        # does not read keeps a transport with unsent replies open, so those are cut.
        connections = dict(self._connections)
        for conn in connections.values():
            conn.writer.close()
        if not connections:
            return
        linger = self._limits.close_linger
        _done, pending = await asyncio.wait(list(connections), timeout=linger)
        for task in pending:
            connections[task].writer.transport.abort()
        if pending:
            await asyncio.wait(pending, timeout=linger)

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    @property
    def requests_in_flight(self) -> int:
        return sum(conn.in_flight for conn in self._connections.values())

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        try:
            if len(self._connections) >= self._limits.max_connections:
                self._log_refusal()
                return
            if not _peer_is_same_user(writer):
                log.warning("refusing ttrpc connection from another user")
                return
            conn = _Connection(self, reader, writer)
            self._connections[task] = conn
            await conn.run()
        finally:
            self._connections.pop(task, None)
            await _close(writer, self._limits.close_linger)

    def _log_refusal(self) -> None:
        self._refused += 1
        now = asyncio.get_running_loop().time()
        if self._refusal_logged_at is None or now - self._refusal_logged_at >= _REFUSAL_LOG_INTERVAL:
            log.warning(
                "closing new ttrpc connection: %d already open (the limit); %d refused so far",
                len(self._connections),
                self._refused,
            )
            self._refusal_logged_at = now

    def _lookup(self, service: str, method: str) -> Handler:
        methods = self._services.get(service)
        if methods is None:
            raise UnimplementedError(f"service {service[:_NAME_ECHO]}")
        handler = methods.get(method)
        if handler is None:
            raise UnimplementedError(f"method {method[:_NAME_ECHO]}")
        return handler


class _Connection:
    def __init__(self, server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._server = server
        self._limits = server._limits
        self._reader = reader
        self.writer = writer
        self._write_lock = asyncio.Lock()
        self._last_stream = 0
        self._inflight: set[asyncio.Task[None]] = set()
        self._inflight_bytes = 0
        self._room = asyncio.Event()
        # drain() then waits whenever this much is queued for a peer that is slow to read.
        writer.transport.set_write_buffer_limits(high=self._limits.write_high_water)

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    async def run(self) -> None:
        try:
            while True:
                if not await self._wait_for_room():
                    return
                try:
                    frame = await framing.read_frame(self._reader, self._limits.frame_timeout)
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

    def _full(self) -> bool:
        return len(self._inflight) >= self._limits.max_inflight or (
            self._inflight_bytes >= self._limits.max_inflight_bytes
        )

    async def _wait_for_room(self) -> bool:
        """Back-pressure: read nothing more until a request finishes. False if the peer left."""
        while self._full():
            self._room.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_EOF_POLL):
                    await self._room.wait()
            # Not reading means not seeing the peer hang up; a pending Wait could otherwise
            # hold this connection long after it is gone.
            if self._reader.at_eof():
                return False
        return True

    def _accept(self, frame: framing.Frame) -> None:
        if frame.type != framing.MessageType.REQUEST:
            # Streaming data frames (ttrpc 1.2) have no use in the Task API; ignore them
            # as ttrpc does for types it does not handle.
            return
        if frame.oversize:
            message = f"message length {frame.oversize} exceeds maximum message size of {framing.MAX_PAYLOAD}"
            self._spawn(self._reply_status(frame.stream_id, Code.RESOURCE_EXHAUSTED, message), 0)
            return
        if frame.stream_id % 2 == 0 or frame.stream_id <= self._last_stream:
            message = f"invalid stream id {frame.stream_id}"
            self._spawn(self._reply_status(frame.stream_id, Code.INVALID_ARGUMENT, message), 0)
            return
        self._last_stream = frame.stream_id
        self._spawn(self._handle(frame.stream_id, frame.payload), len(frame.payload))

    def _spawn(self, coro: Awaitable[None], size: int) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._inflight.add(task)
        self._inflight_bytes += size
        task.add_done_callback(functools.partial(self._finished, size))

    def _finished(self, size: int, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._inflight_bytes -= size
        self._room.set()
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("ttrpc request task failed", exc_info=exc)

    async def _handle(self, stream_id: int, payload: bytes) -> None:
        response = request_pb2.Response()
        service = method = ""
        try:
            request = _parse_request(payload)
            del payload  # the request holds what is still needed
            service, method = request.service[:_NAME_ECHO], request.method[:_NAME_ECHO]
            ctx = CallContext(request.service, request.method, _metadata(request, self._limits))
            handler = self._server._lookup(request.service, request.method)
            deadline = request.timeout_nano / 1e9 if request.timeout_nano > 0 else None
            async with asyncio.timeout(deadline):
                reply = await handler(request.payload, ctx)
            response.status.code = Code.OK
            response.payload = reply
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every failure becomes a status, never a dead shim
            if isinstance(exc, DecodeError):
                # A handler decoding a nested message (an Any's value) met the peer's garbage.
                exc = InvalidArgumentError(f"{method}: malformed message: {exc}")
            code, message = status_for(exc)
            if code == Code.UNKNOWN:
                log.exception("%s/%s failed", service, method)
            else:
                log.info("%s/%s: %s", service, method, message)
            response.status.code = code
            response.status.message = message
        await self._send(stream_id, response.SerializeToString())

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
                self.writer.write(data)
                await self.writer.drain()
            except (ConnectionError, OSError):
                pass


def _parse_request(payload: bytes) -> request_pb2.Request:
    request = request_pb2.Request()
    try:
        request.ParseFromString(payload)
    except DecodeError as exc:
        raise InvalidArgumentError(f"malformed ttrpc request: {exc}") from exc
    return request


def _metadata(request: request_pb2.Request, limits: Limits) -> dict[str, tuple[str, ...]]:
    """Group metadata by lower-cased key, in one pass and within the caps."""
    count = len(request.metadata)
    if count > limits.max_metadata_entries:
        raise InvalidArgumentError(f"ttrpc metadata has {count} entries, more than {limits.max_metadata_entries}")
    grouped: dict[str, list[str]] = {}
    size = 0
    for kv in request.metadata:
        size += kv.ByteSize()
        if size > limits.max_metadata_bytes:
            raise InvalidArgumentError(f"ttrpc metadata is over {limits.max_metadata_bytes} bytes")
        grouped.setdefault(kv.key.lower(), []).append(kv.value)
    return {key: tuple(values) for key, values in grouped.items()}


async def _close(writer: asyncio.StreamWriter, linger: float) -> None:
    """Close, letting queued replies out; a peer that does not read them is cut off."""
    writer.close()
    try:
        async with asyncio.timeout(linger):
            await writer.wait_closed()
    except TimeoutError:
        writer.transport.abort()
    except Exception:  # the peer reset it; nothing left to do
        return


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
