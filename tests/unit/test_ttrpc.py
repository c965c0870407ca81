"""ttrpc framing, server and client against each other over a real Unix socket."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from hotrestart.api.containerd.task.v2 import shim_pb2 as task
from hotrestart.api.ttrpc import request_pb2
from hotrestart.errors import Code, InvalidArgumentError, InvalidTransitionError, NotFoundError, ShimError, status_for
from hotrestart.ttrpc import framing, limits
from hotrestart.ttrpc.client import Client, StatusError
from hotrestart.ttrpc.limits import Limits
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


async def echo(payload: bytes, ctx: CallContext) -> bytes:
    return payload


async def decode_nested(payload: bytes, ctx: CallContext) -> bytes:
    # Decodes without the `unary` wrapper, as a handler unpacking an Any's value would.
    return task.StateRequest.FromString(payload).SerializeToString()


Served = tuple[str, Fake, Server]
Serve = Callable[[Limits], Awaitable[Served]]


@pytest.fixture
async def serve(tmp_path: os.PathLike[str]) -> AsyncIterator[Serve]:
    servers: list[Server] = []

    async def start(limits: Limits) -> Served:
        path = os.path.join(str(tmp_path), f"s{len(servers)}")
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(path)
        sock.listen()
        fake = Fake()
        server = Server(limits)
        server.register(
            SERVICE,
            {
                "State": unary(task.StateRequest, fake.state),
                "Wait": unary(task.WaitRequest, fake.wait),
                "Echo": echo,
                "Decode": decode_nested,
            },
        )
        await server.serve_socket(sock)
        servers.append(server)
        return path, fake, server

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def served(serve: Serve) -> Served:
    return await serve(Limits())


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


def _request(stream_id: int, method: str, payload: bytes = b"", **fields: object) -> bytes:
    req = request_pb2.Request(service=SERVICE, method=method, payload=payload, **fields)  # type: ignore[arg-type]
    return framing.encode(stream_id, framing.MessageType.REQUEST, req.SerializeToString())


async def _replies(reader: asyncio.StreamReader, count: int) -> dict[int, request_pb2.Response]:
    replies = {}
    for _ in range(count):
        frame = await asyncio.wait_for(framing.read_frame(reader), 5)
        assert frame is not None
        replies[frame.stream_id] = request_pb2.Response.FromString(frame.payload)
    return replies


async def test_metadata_is_linear_and_capped(served: Served) -> None:
    path, fake, _ = served
    client = await Client.connect(path)
    state = task.StateRequest(id="c").SerializeToString()
    entries = [request_pb2.KeyValue(key="k", value="v")] * 200_000
    reader, writer = await _raw(path, _request(1, "State", state, metadata=entries))
    started = time.monotonic()
    reply = (await _replies(reader, 1))[1]
    # The quadratic gathering took seconds for this; it is refused before any handler runs.
    assert time.monotonic() - started < 2
    assert reply.status.code == Code.INVALID_ARGUMENT and "entries" in reply.status.message
    big = [request_pb2.KeyValue(key="k", value="v" * 1000)] * 100  # few entries, ~100 KiB
    writer.write(_request(3, "State", state, metadata=big))
    reply = (await _replies(reader, 1))[3]
    assert reply.status.code == Code.INVALID_ARGUMENT and "bytes" in reply.status.message
    # Right at the entry cap is fine, and repeated keys keep their order.
    at_cap = {"containerd-namespace-ttrpc": "k8s.io"}
    at_cap.update({f"k{i}": "v" for i in range(limits.MAX_METADATA_ENTRIES - 1)})
    assert await client.call(SERVICE, "State", task.StateRequest(id="c"), metadata=at_cap)
    assert fake.namespaces == ["k8s.io"]
    writer.close()
    await client.close()


async def test_repeated_metadata_keys_group_case_insensitively(served: Served) -> None:
    path, _, server = served
    seen: list[CallContext] = []

    async def record(payload: bytes, ctx: CallContext) -> bytes:
        seen.append(ctx)
        return b""

    server.register(SERVICE, {"Record": record})
    entries = [request_pb2.KeyValue(key=k, value=v) for k, v in [("A", "1"), ("b", "2"), ("a", "3")]]
    reader, writer = await _raw(path, _request(1, "Record", metadata=entries))
    assert (await _replies(reader, 1))[1].status.code == Code.OK
    assert dict(seen[0].metadata) == {"a": ("1", "3"), "b": ("2",)}
    writer.close()


async def test_decode_errors_anywhere_are_invalid_argument(served: Served) -> None:
    path, _, _ = served
    client = await Client.connect(path)
    with pytest.raises(StatusError) as info:
        await client.call(SERVICE, "Decode", b"\x0a\xff\xff\xff")
    assert info.value.code == Code.INVALID_ARGUMENT
    await client.close()


def test_malformed_checkpoint_options_are_invalid_argument() -> None:
    from google.protobuf import any_pb2

    from hotrestart.service.task import CHECKPOINT_OPTIONS, _checkpoint_config

    garbage = any_pb2.Any(type_url=f"types.containerd.io/{CHECKPOINT_OPTIONS}", value=b"\x0a\xff\xff\xff")
    with pytest.raises(InvalidArgumentError):
        _checkpoint_config("/tmp/x", garbage)


async def _until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_requests_in_flight_are_capped_per_connection(serve: Serve) -> None:
    path, fake, server = await serve(Limits(max_inflight=4))
    data = b"".join(_request(2 * i + 1, "Wait", task.WaitRequest(id="c").SerializeToString()) for i in range(10))
    reader, writer = await _raw(path, data)
    await _until(lambda: server.requests_in_flight == 4)
    await asyncio.sleep(0.1)
    assert server.requests_in_flight == 4  # the other six wait unread
    # Another connection is not held up by this one.
    client = await Client.connect(path)
    assert await client.call(SERVICE, "State", task.StateRequest(id="ok"))
    fake.release.set()
    replies = await _replies(reader, 10)
    assert sorted(replies) == list(range(1, 20, 2))
    assert all(r.status.code == Code.OK for r in replies.values())
    writer.close()
    await client.close()


async def test_request_bytes_in_flight_are_capped(serve: Serve) -> None:
    path, fake, server = await serve(Limits(max_inflight_bytes=100_000))
    wait = task.WaitRequest(id="x" * 60_000).SerializeToString()
    reader, writer = await _raw(path, b"".join(_request(2 * i + 1, "Wait", wait) for i in range(4)))
    await _until(lambda: server.requests_in_flight == 2)
    await asyncio.sleep(0.1)
    assert server.requests_in_flight == 2  # 120 kB held; the rest stay in the socket
    fake.release.set()
    assert len(await _replies(reader, 4)) == 4
    writer.close()


async def test_peer_that_never_reads_stalls_itself(serve: Serve) -> None:
    path, _, server = await serve(Limits(max_inflight=8, write_high_water=16 << 10))
    sock = socket.socket(socket.AF_UNIX)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(path)
    sock.setblocking(False)
    body = os.urandom(32 << 10)
    count = 200
    data = b"".join(_request(2 * i + 1, "Echo", body) for i in range(count))
    sent = 0
    while sent < len(data):
        try:
            sent += sock.send(data[sent:])
        except BlockingIOError:
            await asyncio.sleep(0.2)
            try:
                sent += sock.send(data[sent:])
            except BlockingIOError:
                break
        assert server.requests_in_flight <= 8
    # The server stopped reading: the socket filled after a bounded part of the requests.
    assert sent < len(data) // 2
    assert server.requests_in_flight == 8
    # Once the peer reads, everything it sends is answered.
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    writer.write(data[sent:])
    replies = await _replies(reader, count)
    assert all(r.status.code == Code.OK and r.payload == body for r in replies.values())
    writer.close()


async def test_peer_gone_while_stalled_is_noticed(serve: Serve) -> None:
    path, _, server = await serve(Limits(max_inflight=2))
    wait = task.WaitRequest(id="c").SerializeToString()
    _reader, writer = await _raw(path, b"".join(_request(2 * i + 1, "Wait", wait) for i in range(2)))
    await _until(lambda: server.requests_in_flight == 2)
    writer.close()
    # The pending Waits never finish, yet the connection and its tasks go.
    await _until(lambda: server.connection_count == 0 and server.requests_in_flight == 0, timeout=5)


async def test_connections_over_the_cap_are_closed_at_once(serve: Serve, caplog: pytest.LogCaptureFixture) -> None:
    path, _, server = await serve(Limits(max_connections=3))
    clients = [await Client.connect(path) for _ in range(3)]
    for client in clients:
        assert await client.call(SERVICE, "State", task.StateRequest(id="ok"))
    with caplog.at_level(logging.WARNING, logger="hotrestart.ttrpc.server"):
        reader, writer = await asyncio.open_unix_connection(path)
        assert await asyncio.wait_for(reader.read(), 2) == b""
    assert "already open" in caplog.text
    writer.close()
    assert server.connection_count == 3
    await clients.pop().close()
    await _until(lambda: server.connection_count == 2)
    client = await Client.connect(path)
    assert await client.call(SERVICE, "State", task.StateRequest(id="ok"))
    for c in [*clients, client]:
        await c.close()


async def test_stalled_frame_closes_but_quiet_connection_stays(serve: Serve) -> None:
    path, _, server = await serve(Limits(frame_timeout=0.2))
    client = await Client.connect(path)
    assert await client.call(SERVICE, "State", task.StateRequest(id="ok"))
    reader, writer = await _raw(path, _request(1, "State")[:7])  # half a header, then nothing
    assert await asyncio.wait_for(reader.read(), 3) == b""
    writer.close()
    reader, writer = await _raw(path, _request(1, "State")[:15])  # header and part of the payload
    assert await asyncio.wait_for(reader.read(), 3) == b""
    writer.close()
    # Between frames there is no timeout: containerd's connection may be quiet for hours.
    await asyncio.sleep(0.5)
    assert not client.closed
    assert await client.call(SERVICE, "State", task.StateRequest(id="ok"))
    assert server.connection_count == 1
    await client.close()


async def test_slow_peer_within_the_frame_timeout_is_served(serve: Serve) -> None:
    path, _, _ = await serve(Limits(frame_timeout=5))
    reader, writer = await asyncio.open_unix_connection(path)
    for byte in _request(1, "State", task.StateRequest(id="slow").SerializeToString()):
        writer.write(bytes([byte]))
        await writer.drain()
        await asyncio.sleep(0.001)
    assert (await _replies(reader, 1))[1].status.code == Code.OK
    writer.close()


def test_ttrpc_errors_are_shim_errors() -> None:
    # A peer's status relays as itself; a broken stream reads as an unavailable peer.
    relayed = StatusError(Code.NOT_FOUND, "container missing")
    assert isinstance(relayed, ShimError)
    assert status_for(relayed) == (Code.NOT_FOUND, "NOT_FOUND: container missing")
    odd = StatusError(99, "from a newer peer")
    assert (odd.code, str(odd)) == (Code.UNKNOWN, "99: from a newer peer")
    torn = framing.FrameError("truncated ttrpc header")
    assert isinstance(torn, ShimError)
    assert status_for(torn) == (Code.UNAVAILABLE, "truncated ttrpc header")
