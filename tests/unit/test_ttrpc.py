"""ttrpc framing, server and client against each other over a real Unix socket."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import AsyncIterator

import pytest

from hotrestart.api.containerd.task.v2 import shim_pb2 as task
from hotrestart.api.ttrpc import request_pb2
from hotrestart.errors import Code, InvalidTransitionError, NotFoundError
from hotrestart.ttrpc import framing
from hotrestart.ttrpc.client import Client, StatusError
from hotrestart.ttrpc.server import CallContext, Server, unary

SERVICE = "containerd.task.v2.Task"


class Fake:
    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.namespaces: list[str] = []

    async def state(self, r: task.StateRequest, ctx: CallContext) -> task.StateResponse:
        self.namespaces.append(ctx.namespace)
        if r.id == "missing":
            raise NotFoundError("container missing: container not created")
        if r.id == "wrong":
            raise InvalidTransitionError("stopped", "start")
        if r.id == "boom":
            raise RuntimeError("unexpected")
        return task.StateResponse(id=r.id, pid=42)

    async def wait(self, r: task.WaitRequest, ctx: CallContext) -> task.WaitResponse:
        await self.release.wait()
        return task.WaitResponse(exit_status=7)


@pytest.fixture
async def served(tmp_path: os.PathLike[str]) -> AsyncIterator[tuple[str, Fake, Server]]:
    path = os.path.join(str(tmp_path), "s")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(path)
    sock.listen()
    fake = Fake()
    server = Server()
    server.register(
        SERVICE, {"State": unary(task.StateRequest, fake.state), "Wait": unary(task.WaitRequest, fake.wait)}
    )
    await server.serve_socket(sock)
    yield path, fake, server
    await server.close()


def test_header_layout() -> None:
    frame = framing.encode(5, framing.MessageType.RESPONSE, b"abc", flags=0)
    assert frame == b"\x00\x00\x00\x03\x00\x00\x00\x05\x02\x00abc"
    with pytest.raises(ValueError):
        framing.encode(1, 1, b"x" * (framing.MAX_PAYLOAD + 1))


async def test_call_and_metadata(served: tuple[str, Fake, Server]) -> None:
    path, fake, _ = served
    client = await Client.connect(path)
    reply = task.StateResponse.FromString(
        await client.call(
            SERVICE, "State", task.StateRequest(id="c1"), metadata={"containerd-namespace-ttrpc": "k8s.io"}
        )
    )
    assert (reply.id, reply.pid) == ("c1", 42)
    assert fake.namespaces == ["k8s.io"]
    await client.close()


async def test_errors_map_to_codes(served: tuple[str, Fake, Server]) -> None:
    path, _, _ = served
    client = await Client.connect(path)
    cases = {"missing": Code.NOT_FOUND, "wrong": Code.FAILED_PRECONDITION, "boom": Code.UNKNOWN}
    for cid, code in cases.items():
        with pytest.raises(StatusError) as info:
            await client.call(SERVICE, "State", task.StateRequest(id=cid))
        assert info.value.code == code
    with pytest.raises(StatusError) as info:
        await client.call(SERVICE, "Nope", b"")
    assert info.value.code == Code.UNIMPLEMENTED and "method Nope" in info.value.message
    with pytest.raises(StatusError) as info:
        await client.call("containerd.other.v1.X", "State", b"")
    assert info.value.code == Code.UNIMPLEMENTED and "service" in info.value.message
    with pytest.raises(StatusError) as info:
        await client.call(SERVICE, "State", b"\xff\xff\xff")
    assert info.value.code == Code.INVALID_ARGUMENT
    # The connection survived all of it.
    assert (await client.call(SERVICE, "State", task.StateRequest(id="ok"))) != b""
    await client.close()


async def test_concurrent_calls_answer_out_of_order(served: tuple[str, Fake, Server]) -> None:
    path, fake, _ = served
    client = await Client.connect(path)
    waiting = asyncio.ensure_future(client.call(SERVICE, "Wait", task.WaitRequest(id="c1")))
    await asyncio.sleep(0.05)
    # A long Wait must not block other calls on the same connection.
    state = await asyncio.wait_for(client.call(SERVICE, "State", task.StateRequest(id="c1")), 2)
    assert task.StateResponse.FromString(state).pid == 42
    assert not waiting.done()
    fake.release.set()
    assert task.WaitResponse.FromString(await waiting).exit_status == 7
    await client.close()


async def test_timeout_nano_is_enforced(served: tuple[str, Fake, Server]) -> None:
    path, _, _ = served
    reader, writer = await asyncio.open_unix_connection(path)
    req = request_pb2.Request(service=SERVICE, method="Wait", payload=b"", timeout_nano=50_000_000)
    writer.write(framing.encode(1, framing.MessageType.REQUEST, req.SerializeToString()))
    frame = await asyncio.wait_for(framing.read_frame(reader), 5)
    assert frame is not None
    assert request_pb2.Response.FromString(frame.payload).status.code == Code.DEADLINE_EXCEEDED
    writer.close()


async def _raw(path: str, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(data)
    await writer.drain()
    return reader, writer


async def test_oversize_frame_gets_resource_exhausted_and_stream_continues(served: tuple[str, Fake, Server]) -> None:
    path, _, _ = served
    size = framing.MAX_PAYLOAD + 10
    data = struct.pack(">IIBB", size, 1, 1, 0) + b"\0" * size
    ok = request_pb2.Request(service=SERVICE, method="State", payload=task.StateRequest(id="x").SerializeToString())
    data += framing.encode(3, framing.MessageType.REQUEST, ok.SerializeToString())
    reader, writer = await _raw(path, data)
    replies = {}
    for _ in range(2):
        frame = await asyncio.wait_for(framing.read_frame(reader), 5)
        assert frame is not None
        replies[frame.stream_id] = request_pb2.Response.FromString(frame.payload)
    assert replies[1].status.code == Code.RESOURCE_EXHAUSTED
    assert replies[3].status.code == Code.OK
    writer.close()


async def test_garbage_request_and_bad_stream_ids(served: tuple[str, Fake, Server]) -> None:
    path, _, _ = served
    data = framing.encode(1, framing.MessageType.REQUEST, b"\x0a\xff\xff\xff")  # truncated field
    data += framing.encode(2, framing.MessageType.REQUEST, b"")  # even id
    reader, writer = await _raw(path, data)
    codes = {}
    for _ in range(2):
        frame = await asyncio.wait_for(framing.read_frame(reader), 5)
        assert frame is not None
        codes[frame.stream_id] = request_pb2.Response.FromString(frame.payload).status.code
    assert codes == {1: Code.INVALID_ARGUMENT, 2: Code.INVALID_ARGUMENT}
    writer.close()


async def test_truncated_frame_closes_only_that_connection(served: tuple[str, Fake, Server]) -> None:
    path, _, _ = served
    _reader, writer = await _raw(path, struct.pack(">IIBB", 100, 1, 1, 0) + b"short")
    writer.write_eof()
    await asyncio.sleep(0.05)
    writer.close()
    client = await Client.connect(path)
    assert await client.call(SERVICE, "State", task.StateRequest(id="ok"))
    await client.close()


async def test_client_sees_connection_loss(served: tuple[str, Fake, Server]) -> None:
    path, _, server = served
    client = await Client.connect(path)
    pending = asyncio.ensure_future(client.call(SERVICE, "Wait", task.WaitRequest(id="c")))
    await asyncio.sleep(0.05)
    await server.close()
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(pending, 5)
    await client.close()
