"""Task events, published to containerd with ttrpc `Events/Forward`.

Publishing is decoupled from the calls that cause events: `publish` only queues, and one
task forwards in order, so an event never delays a Task reply and create, start, exit and
delete reach containerd in the order they happened. Failed forwards are retried a few times
with a growing delay, as containerd's own shims do, then dropped with a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Protocol

from google.protobuf import any_pb2, timestamp_pb2
from google.protobuf.message import Message

from hotrestart.api.containerd.events import task_pb2 as ev
from hotrestart.api.containerd.services.events.ttrpc.v1 import events_pb2 as forward_pb2
from hotrestart.ttrpc.client import Client

log = logging.getLogger(__name__)

FORWARD_SERVICE = "containerd.services.events.ttrpc.v1.Events"
NAMESPACE_KEY = "containerd-namespace-ttrpc"
QUEUE_LIMIT = 2048
MAX_ATTEMPTS = 5


class EventSink(Protocol):
    def publish(self, topic: str, event: Message) -> None: ...


def pack(event: Message) -> any_pb2.Any:
    # containerd 1.6 resolves only bare type names, so no type.googleapis.com/ prefix.
    return any_pb2.Any(type_url=event.DESCRIPTOR.full_name, value=event.SerializeToString())


def now_timestamp() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(time.time_ns())
    return ts


class Publisher:
    def __init__(self, address: str, namespace: str) -> None:
        self._address = address
        self._namespace = namespace
        self._queue: asyncio.Queue[forward_pb2.ForwardRequest] = asyncio.Queue(QUEUE_LIMIT)
        self._client: Client | None = None
        self._task: asyncio.Task[None] | None = None

    def publish(self, topic: str, event: Message) -> None:
        request = forward_pb2.ForwardRequest()
        env = request.envelope
        env.timestamp.CopyFrom(now_timestamp())
        env.namespace = self._namespace
        env.topic = topic
        env.event.CopyFrom(pack(event))
        try:
            self._queue.put_nowait(request)
        except asyncio.QueueFull:
            log.error("event queue full, dropping %s", topic)
            return
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._forward_all())

    async def _forward_all(self) -> None:
        while not self._queue.empty():
            request = self._queue.get_nowait()
            for attempt in range(1, MAX_ATTEMPTS + 1):
                try:
                    await self._forward(request)
                    break
                except Exception as exc:
                    log.warning("forwarding %s failed (attempt %d): %s", request.envelope.topic, attempt, exc)
                    await self._disconnect()
                    if attempt == MAX_ATTEMPTS:
                        log.error("dropping event %s", request.envelope.topic)
                    else:
                        await asyncio.sleep(min(attempt, 3) * 0.5)

    async def _forward(self, request: forward_pb2.ForwardRequest) -> None:
        if not self._address:
            return
        if self._client is None or self._client.closed:
            self._client = await Client.connect(self._address)
        await self._client.call(
            FORWARD_SERVICE, "Forward", request, metadata={NAMESPACE_KEY: self._namespace}, timeout=5.0
        )

    async def _disconnect(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()

    async def drain(self, timeout: float = 5.0) -> None:
        """Wait (bounded) until queued events are out; used on shim exit."""
        if self._task is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(timeout):
                    await asyncio.shield(self._task)
        await self._disconnect()


class TaskEvents:
    """The containerd task events, built from plain values (the container layer's view)."""

    def __init__(self, sink: EventSink) -> None:
        self._sink = sink

    def create(
        self,
        cid: str,
        bundle: str,
        rootfs: list[tuple[str, str, tuple[str, ...]]],
        stdin: str,
        stdout: str,
        stderr: str,
        terminal: bool,
        checkpoint: str,
        pid: int,
    ) -> None:
        msg = ev.TaskCreate(container_id=cid, bundle=bundle, checkpoint=checkpoint, pid=pid)
        for mtype, source, options in rootfs:
            msg.rootfs.add(type=mtype, source=source, options=list(options))
        msg.io.stdin, msg.io.stdout, msg.io.stderr, msg.io.terminal = stdin, stdout, stderr, terminal
        self._sink.publish("/tasks/create", msg)

    def start(self, cid: str, pid: int) -> None:
        self._sink.publish("/tasks/start", ev.TaskStart(container_id=cid, pid=pid))

    def exit(self, cid: str, process_id: str, pid: int, status: int, exited_at_ns: int) -> None:
        msg = ev.TaskExit(container_id=cid, id=process_id, pid=pid, exit_status=status)
        msg.exited_at.FromNanoseconds(exited_at_ns)
        self._sink.publish("/tasks/exit", msg)

    def delete(self, cid: str, pid: int, status: int, exited_at_ns: int) -> None:
        msg = ev.TaskDelete(container_id=cid, pid=pid, exit_status=status)
        if exited_at_ns:
            msg.exited_at.FromNanoseconds(exited_at_ns)
        self._sink.publish("/tasks/delete", msg)

    def exec_added(self, cid: str, exec_id: str) -> None:
        self._sink.publish("/tasks/exec-added", ev.TaskExecAdded(container_id=cid, exec_id=exec_id))

    def exec_started(self, cid: str, exec_id: str, pid: int) -> None:
        self._sink.publish("/tasks/exec-started", ev.TaskExecStarted(container_id=cid, exec_id=exec_id, pid=pid))

    def oom(self, cid: str) -> None:
        self._sink.publish("/tasks/oom", ev.TaskOOM(container_id=cid))

    def paused(self, cid: str) -> None:
        self._sink.publish("/tasks/paused", ev.TaskPaused(container_id=cid))

    def resumed(self, cid: str) -> None:
        self._sink.publish("/tasks/resumed", ev.TaskResumed(container_id=cid))

    def checkpointed(self, cid: str, checkpoint: str) -> None:
        self._sink.publish("/tasks/checkpointed", ev.TaskCheckpointed(container_id=cid, checkpoint=checkpoint))
