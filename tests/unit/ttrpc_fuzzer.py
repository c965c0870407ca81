"""The ttrpc fuzzer shared by the fuzz tests: peers of every kind, and what they met."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable

from ttrpc_fuzz_server import FRAME_TIMEOUT, SERVICE, fds, rss, until

from hotrestart.api.containerd.task.v2 import shim_pb2 as task
from hotrestart.api.ttrpc import request_pb2
from hotrestart.errors import Code
from hotrestart.ttrpc import framing, limits
from hotrestart.ttrpc.client import Client
from hotrestart.ttrpc.server import Server

SEED = int(os.environ.get("HOTRESTART_FUZZ_SEED", "20261129"))
FRAMES = int(os.environ.get("HOTRESTART_FUZZ_FRAMES", "100000"))
# Peers running at once, well under MAX_CONNECTIONS so that the prober is never refused.
CONCURRENCY = 24
PEER_DEADLINE = 20.0
PROBE_INTERVAL = 0.05
PROBE_DEADLINE = 2.0
# Memory after the first round (every kind of peer has run, so caches and allocator pools
# are warm) against the end, with every connection gone. What a peer can pin is bounded by
# the per-connection caps and released with it, so steady state barely grows (well under
# 1 MiB here). 16 MiB is caught by a leak of 160 bytes a frame, or by replies piling up for
# peers that never read (those grew the shim by about 500 MiB before the caps).
RSS_GROWTH_BOUND = 16 << 20
# The peak, against the start, also counts the fuzzer's own buffers (oversize frames are
# 4 MiB each) and the concurrent peers' pinned requests; the caps keep it to tens of MiB.
RSS_PEAK_BOUND = 256 << 20
# Descriptors: two per concurrent peer (both ends live in this process), the prober's two,
# the over-the-cap burst's two per connection, and slack for the listening socket and logs.
FD_BOUND = 2 * limits.MAX_CONNECTIONS + 2 * (CONCURRENCY + 16) + 16


class Stats:
    def __init__(self) -> None:
        self.frames = 0
        self.connections = 0
        self.replies: dict[str, int] = {}
        self.refused = 0
        self.max_fds = 0
        self.max_rss = 0
        self.probes = 0
        self.max_probe = 0.0

    def code(self, code: int) -> None:
        name = Code(code).name if code in Code._value2member_map_ else str(code)
        self.replies[name] = self.replies.get(name, 0) + 1


class Fuzzer:
    def __init__(self, path: str, server: Server, rng: random.Random) -> None:
        self.path = path
        self.server = server
        self.rng = rng
        self.stats = Stats()
        self._huge_metadata: dict[int, bytes] = {}

    # Frames.

    def valid(self, stream_id: int) -> tuple[bytes, bytes | None]:
        """A well-formed request and the payload an OK reply must carry (None: any)."""
        rng = self.rng
        kind = rng.randrange(4)
        metadata = [request_pb2.KeyValue(key=f"k{rng.randrange(8)}", value="v" * rng.randrange(16)) for _ in range(3)]
        if kind == 0:
            body = rng.randbytes(rng.randrange(256))
            req = request_pb2.Request(service=SERVICE, method="Echo", payload=body, metadata=metadata)
            expect: bytes | None = body
        elif kind == 1:
            state = task.StateRequest(id=f"c{rng.randrange(1000)}")
            req = request_pb2.Request(service=SERVICE, method="State", payload=state.SerializeToString())
            expect = task.StateResponse(id=state.id, pid=0).SerializeToString()
        elif kind == 2:
            state = task.StateRequest(id="d")
            req = request_pb2.Request(service=SERVICE, method="Decode", payload=state.SerializeToString())
            expect = state.SerializeToString()
        else:
            req = request_pb2.Request(service=SERVICE, method="Yield", payload=b"y" * 32, timeout_nano=10**10)
            expect = b"y" * 16
        return framing.encode(stream_id, framing.MessageType.REQUEST, req.SerializeToString()), expect

    def mutated(self, stream_id: int) -> bytes:
        frame = bytearray(self.valid(stream_id)[0])
        for _ in range(self.rng.randrange(1, 4)):
            frame[self.rng.randrange(len(frame))] ^= self.rng.randrange(1, 256)
        return bytes(frame)

    def huge_metadata(self, stream_id: int) -> bytes:
        entries = self.rng.choice([limits.MAX_METADATA_ENTRIES + 1, 20_000, 100_000, 0])
        if entries not in self._huge_metadata:
            if entries:
                kvs = [request_pb2.KeyValue(key="k", value="v")] * entries
            else:  # few entries, over the byte cap
                kvs = [request_pb2.KeyValue(key="k", value="v" * 4096)] * 20
            req = request_pb2.Request(service=SERVICE, method="Echo", metadata=kvs)
            self._huge_metadata[entries] = req.SerializeToString()
        return framing.encode(stream_id, framing.MessageType.REQUEST, self._huge_metadata[entries])

    # Peers; each returns how many frames it sent.

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        self.stats.connections += 1
        return await asyncio.open_unix_connection(self.path)

    async def _read_all(self, reader: asyncio.StreamReader, timeout: float = 10.0) -> list[request_pb2.Response]:
        """Every reply until the server closes; each must be a well-formed response."""
        replies = []
        async with asyncio.timeout(timeout):
            while True:
                try:
                    frame = await framing.read_frame(reader)
                except (framing.FrameError, ConnectionError):
                    break
                if frame is None:
                    break
                assert frame.type == framing.MessageType.RESPONSE
                response = request_pb2.Response.FromString(frame.payload)
                self.stats.code(response.status.code)
                replies.append(response)
        return replies

    async def well_behaved(self, count: int) -> int:
        reader, writer = await self._open()
        frames: list[bytes] = []
        expected: dict[int, bytes | None] = {}
        for i in range(count):
            data, expect = self.valid(2 * i + 1)
            frames.append(data)
            expected[2 * i + 1] = expect
        writer.write(b"".join(frames))
        for _ in range(count):
            frame = await asyncio.wait_for(framing.read_frame(reader), 10)
            assert frame is not None
            response = request_pb2.Response.FromString(frame.payload)
            self.stats.code(response.status.code)
            assert response.status.code == Code.OK, response.status.message
            want = expected.pop(frame.stream_id)
            assert want is None or response.payload == want
        writer.close()
        return count

    async def mutating(self, count: int) -> int:
        reader, writer = await self._open()
        frames = [
            self.mutated(2 * i + 1) if self.rng.random() < 0.6 else self.valid(2 * i + 1)[0] for i in range(count)
        ]
        with contextlib.suppress(ConnectionError):
            writer.write(b"".join(frames))
            writer.write_eof()
        await self._read_all(reader)
        writer.close()
        return count

    async def truncating(self, count: int, abrupt: bool) -> int:
        reader, writer = await self._open()
        frames = [self.valid(2 * i + 1)[0] for i in range(count - 1)]
        last = self.valid(2 * count - 1)[0]
        frames.append(last[: self.rng.randrange(1, len(last))])
        writer.write(b"".join(frames))
        if abrupt:
            await asyncio.sleep(self.rng.random() * 0.01)
            writer.transport.abort()
            return count
        with contextlib.suppress(ConnectionError):
            writer.write_eof()
        await self._read_all(reader)
        writer.close()
        return count

    async def oversize(self, count: int) -> int:
        reader, writer = await self._open()
        for i in range(count - 1):
            size = limits.MAX_PAYLOAD + self.rng.randrange(1, 4096)
            writer.write(framing.HEADER.pack(size, 2 * i + 1, framing.MessageType.REQUEST, 0))
            writer.write(bytes(size))
            await writer.drain()
        writer.write(self.valid(2 * count - 1)[0])
        codes = []
        for _ in range(count):
            frame = await asyncio.wait_for(framing.read_frame(reader), 10)
            assert frame is not None
            codes.append(request_pb2.Response.FromString(frame.payload).status.code)
            self.stats.code(codes[-1])
        assert codes.count(Code.RESOURCE_EXHAUSTED) == count - 1 and codes.count(Code.OK) == 1
        # Then a frame of 4 GiB, and gone after its header.
        writer.write(framing.HEADER.pack(0xFFFFFFFF, 2 * count + 1, framing.MessageType.REQUEST, 0))
        writer.write_eof()
        assert await self._read_all(reader) == []
        writer.close()
        return count + 1

    async def metadata(self, count: int) -> int:
        reader, writer = await self._open()
        for i in range(count):
            started = time.monotonic()
            writer.write(self.huge_metadata(2 * i + 1))
            frame = await asyncio.wait_for(framing.read_frame(reader), 10)
            assert frame is not None
            code = request_pb2.Response.FromString(frame.payload).status.code
            self.stats.code(code)
            assert code == Code.INVALID_ARGUMENT
            assert time.monotonic() - started < 3.0, "huge metadata stalled the server"
        writer.close()
        return count

    async def slow(self, count: int) -> int:
        reader, writer = await self._open()
        for i in range(count):
            req = request_pb2.Request(
                service=SERVICE, method="State", payload=task.StateRequest(id="s").SerializeToString()
            )
            for byte in framing.encode(2 * i + 1, framing.MessageType.REQUEST, req.SerializeToString()):
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0)  # each byte reaches the server on its own
            frame = await asyncio.wait_for(framing.read_frame(reader), 5)
            assert frame is not None
            code = request_pb2.Response.FromString(frame.payload).status.code
            self.stats.code(code)
            assert code == Code.OK
        writer.close()
        return count

    async def slowloris(self) -> int:
        reader, writer = await self._open()
        frame = self.valid(1)[0]
        writer.write(frame[: self.rng.randrange(1, len(frame))])
        # Nothing more: the server must hang up once the frame timeout has passed.
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), FRAME_TIMEOUT + 5) == b""
        assert time.monotonic() - started >= FRAME_TIMEOUT * 0.9
        writer.close()
        return 1

    async def deaf(self) -> int:
        """Pipelines big Echo requests and never reads a reply."""
        self.stats.connections += 1
        sock = socket.socket(socket.AF_UNIX)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(self.path)
        sock.setblocking(False)
        body = self.rng.randbytes(16 << 10)
        req = request_pb2.Request(service=SERVICE, method="Echo", payload=body)
        frame_size = len(framing.encode(1, framing.MessageType.REQUEST, req.SerializeToString()))
        sent = 0
        try:
            for i in range(10_000):
                data = framing.encode(2 * i + 1, framing.MessageType.REQUEST, req.SerializeToString())
                view = memoryview(data)
                while view:
                    try:
                        view = view[sock.send(view) :]
                    except BlockingIOError:
                        await asyncio.sleep(0.05)
                        try:
                            view = view[sock.send(view) :]
                        except BlockingIOError:
                            # Back-pressure reached the peer: the server stopped reading.
                            sent += len(data) - len(view)
                            return sent // frame_size
                sent += len(data)
            raise AssertionError("a peer that never reads was never stalled")
        finally:
            await asyncio.sleep(self.rng.random() * 0.2)
            sock.close()

    async def over_the_cap(self) -> int:
        """More connections than the cap, all at once; the extra ones are closed at once."""
        extra = 8
        opened = [await self._open() for _ in range(limits.MAX_CONNECTIONS + extra)]

        async def closed_at_once(reader: asyncio.StreamReader) -> bool:
            with contextlib.suppress(TimeoutError):
                return await asyncio.wait_for(reader.read(), 0.2) == b""
            return False

        refused = sum(await asyncio.gather(*(closed_at_once(reader) for reader, _ in opened)))
        self.stats.refused += refused
        assert refused >= extra
        # Every accepted one still works.
        for reader, writer in opened:
            if not reader.at_eof():
                writer.write(self.valid(1)[0])
                frame = await asyncio.wait_for(framing.read_frame(reader), 5)
                assert frame is not None
                break
        for _, writer in opened:
            writer.close()
        await until(lambda: self.server.connection_count == 0)
        return 1

    # Orchestration.

    def round(self) -> list[tuple[str, Callable[[], Awaitable[int]]]]:
        rng = self.rng
        peers: list[tuple[str, Callable[[], Awaitable[int]]]] = []
        peers += [("well-behaved", lambda: self.well_behaved(1500)) for _ in range(6)]
        peers += [("mutating", lambda: self.mutating(800)) for _ in range(18)]
        peers += [("truncating", lambda: self.truncating(rng.randrange(2, 60), abrupt=False)) for _ in range(45)]
        peers += [("abrupt", lambda: self.truncating(rng.randrange(2, 60), abrupt=True)) for _ in range(45)]
        peers += [("metadata", lambda: self.metadata(4)) for _ in range(6)]
        peers += [("slow", lambda: self.slow(3)) for _ in range(9)]
        peers += [("slowloris", self.slowloris) for _ in range(3)]
        peers += [("deaf", self.deaf) for _ in range(6)]
        peers += [("oversize", lambda: self.oversize(3)) for _ in range(3)]
        rng.shuffle(peers)
        return peers

    async def run_round(self) -> None:
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(name: str, peer: Callable[[], Awaitable[int]]) -> None:
            async with gate:
                try:
                    async with asyncio.timeout(PEER_DEADLINE):
                        sent = await peer()
                    self.stats.frames += sent
                except TimeoutError:
                    raise AssertionError(f"a {name} peer got no answer within {PEER_DEADLINE} s") from None

        async with asyncio.TaskGroup() as group:
            for name, peer in self.round():
                group.create_task(one(name, peer))

    async def probe(self, stop: asyncio.Event) -> None:
        """A fresh, well-behaved client is answered promptly while the fuzzing goes on."""
        while not stop.is_set():
            started = time.monotonic()
            client = await asyncio.wait_for(Client.connect(self.path), PROBE_DEADLINE)
            reply = await client.call(SERVICE, "State", task.StateRequest(id="probe"), timeout=PROBE_DEADLINE)
            await client.close()
            assert task.StateResponse.FromString(reply).id == "probe"
            self.stats.probes += 1
            self.stats.max_probe = max(self.stats.max_probe, time.monotonic() - started)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), PROBE_INTERVAL)

    async def watch_fds(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.stats.max_fds = max(self.stats.max_fds, fds())
            self.stats.max_rss = max(self.stats.max_rss, rss())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.02)
