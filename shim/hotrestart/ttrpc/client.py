"""ttrpc client: used to publish events to containerd and by tests to drive the shim."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping

from google.protobuf.message import Message

from hotrestart.api.ttrpc import request_pb2
from hotrestart.errors import Code, ShimError
from hotrestart.ttrpc import framing


class StatusError(ShimError):
    """The server answered a call with a non-OK status; `code` is the server's.

    A code outside the known set reads as UNKNOWN (as in gRPC); the message keeps the number."""

    def __init__(self, code: int, message: str) -> None:
        known = code in Code._value2member_map_
        super().__init__(f"{Code(code).name if known else code}: {message}")
        self.code = Code(code) if known else Code.UNKNOWN
        self.message = message


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._next_id = 1
        self._pending: dict[int, asyncio.Future[request_pb2.Response]] = {}
        self._write_lock = asyncio.Lock()
        self._recv_task = asyncio.ensure_future(self._receive())

    @classmethod
    async def connect(cls, path: str) -> Client:
        if path.startswith("unix://"):
            path = path[len("unix://") :]
        reader, writer = await asyncio.open_unix_connection(path)
        return cls(reader, writer)

    @property
    def closed(self) -> bool:
        return self._recv_task.done()

    async def call(
        self,
        service: str,
        method: str,
        request: Message | bytes,
        *,
        metadata: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> bytes:
        if self.closed:
            raise ConnectionError("ttrpc connection is closed")
        req = request_pb2.Request(
            service=service,
            method=method,
            payload=request if isinstance(request, bytes) else request.SerializeToString(),
        )
        if timeout:
            req.timeout_nano = int(timeout * 1e9)
        for key, value in (metadata or {}).items():
            req.metadata.add(key=key, value=value)
        stream_id = self._next_id
        self._next_id += 2
        future: asyncio.Future[request_pb2.Response] = asyncio.get_running_loop().create_future()
        self._pending[stream_id] = future
        try:
            async with self._write_lock:
                self._writer.write(framing.encode(stream_id, framing.MessageType.REQUEST, req.SerializeToString()))
                await self._writer.drain()
            async with asyncio.timeout(timeout):
                response = await future
        finally:
            self._pending.pop(stream_id, None)
        if response.status.code != Code.OK:
            raise StatusError(response.status.code, response.status.message)
        return response.payload

    async def _receive(self) -> None:
        error: BaseException = ConnectionError("ttrpc connection closed")
        try:
            while True:
                frame = await framing.read_frame(self._reader)
                if frame is None:
                    break
                if frame.type != framing.MessageType.RESPONSE:
                    continue
                future = self._pending.get(frame.stream_id)
                if future is None or future.done():
                    continue
                response = request_pb2.Response()
                try:
                    response.ParseFromString(frame.payload)
                except Exception as exc:
                    future.set_exception(exc)
                    continue
                future.set_result(response)
        except (framing.FrameError, OSError) as exc:
            error = ConnectionError(str(exc))
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(error)

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()
        self._recv_task.cancel()
        with contextlib.suppress(BaseException):
            await self._recv_task
