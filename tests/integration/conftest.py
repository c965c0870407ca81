"""Integration tier: the real shim binary and real runc, with this test standing in for containerd."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from google.protobuf import empty_pb2

import objstore
from hotrestart.api.containerd.events import task_pb2 as ev
from hotrestart.api.containerd.services.events.ttrpc.v1 import events_pb2
from hotrestart.ttrpc.client import Client
from hotrestart.ttrpc.server import CallContext, Server, unary
from testbed.ci import in_ci

TESTBED_BIN = "/opt/hotrestart-testbed/bin"
NAMESPACE = "hrtest"
TASK = "containerd.task.v2.Task"
NS_MD = {"containerd-namespace-ttrpc": NAMESPACE}


def _require_testbed() -> None:
    if os.geteuid() != 0 or not os.path.exists(os.path.join(TESTBED_BIN, "runc")) or not shutil.which("busybox"):
        if in_ci():
            pytest.fail("the testbed (hack/install-testbed.sh) is missing in CI")
        pytest.skip("needs root and the testbed from hack/install-testbed.sh")


@pytest.fixture
def env_path() -> Iterator[str]:
    _require_testbed()
    bindir = os.path.dirname(sys.executable)
    path = f"{bindir}:{TESTBED_BIN}:{os.environ.get('PATH', '')}"
    yield path


class EventSink:
    """Plays containerd's side of Events/Forward and records what the shim publishes."""

    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []
        self.changed = asyncio.Event()

    async def forward(self, r: events_pb2.ForwardRequest, ctx: CallContext) -> empty_pb2.Empty:
        name = r.envelope.event.type_url
        cls = getattr(ev, name.rsplit(".", 1)[-1])
        self.events.append((r.envelope.topic, cls.FromString(r.envelope.event.value)))
        self.changed.set()
        return empty_pb2.Empty()

    def topics(self, cid: str | None = None) -> list[str]:
        return [t for t, e in self.events if cid is None or getattr(e, "container_id", None) == cid]

    async def wait_for(self, topic: str, count: int = 1, timeout: float = 10) -> None:
        async with asyncio.timeout(timeout):
            while self.topics().count(topic) < count:
                self.changed.clear()
                await self.changed.wait()


def make_bundle(root: Path, cid: str, args: list[str], *, terminal: bool = False, memory_limit: int = 0) -> Path:
    bundle = root / cid
    rootfs = bundle / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    for d in ("proc", "sys", "dev", "tmp", "etc"):
        (rootfs / d).mkdir()
    busybox = shutil.which("busybox")
    assert busybox
    shutil.copy(busybox, rootfs / "bin" / "busybox")
    for applet in ("sh", "echo", "sleep", "cat", "dd", "ls", "tty"):
        (rootfs / "bin" / applet).symlink_to("busybox")
    subprocess.run([os.path.join(TESTBED_BIN, "runc"), "spec", "--bundle", str(bundle)], check=True)
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"]["args"] = args
    spec["process"]["terminal"] = terminal
    spec["root"]["readonly"] = False
    spec["linux"].setdefault("resources", {})
    if memory_limit:
        spec["linux"]["resources"]["memory"] = {"limit": memory_limit, "swap": memory_limit}
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


class Shim:
    def __init__(self, client: Client, pid: int) -> None:
        self.client = client
        self.pid = pid

    async def call(self, method: str, request: object, reply_type: type | None = None, timeout: float = 30) -> object:
        payload = await self.client.call(TASK, method, request, metadata=NS_MD, timeout=timeout)  # type: ignore[arg-type]
        return reply_type.FromString(payload) if reply_type else payload


@pytest.fixture
async def shim_env(tmp_path: Path, env_path: str) -> AsyncIterator[tuple[Path, EventSink, dict[str, str]]]:
    sink = EventSink()
    server = Server()
    server.register(
        "containerd.services.events.ttrpc.v1.Events", {"Forward": unary(events_pb2.ForwardRequest, sink.forward)}
    )
    events_sock = tmp_path / "events.sock"
    import socket as _socket

    sock = _socket.socket(_socket.AF_UNIX)
    sock.bind(str(events_sock))
    sock.listen()
    await server.serve_socket(sock)
    env = dict(
        os.environ,
        PATH=env_path,
        TTRPC_ADDRESS=str(events_sock),
        HOTRESTART_ZYGOTE_SOCKET=str(tmp_path / "zygote.sock"),
    )
    yield tmp_path, sink, env
    await server.close()
    # Nothing of ours may outlive the test.
    subprocess.run(["pkill", "-9", "-f", f"hotrestart.zygote {tmp_path}/zygote.sock"], check=False)
    subprocess.run(["pkill", "-9", "-f", "--", f"-address {tmp_path}/containerd.sock"], check=False)
    runc_root = Path("/run/containerd/runc") / NAMESPACE
    if runc_root.exists():
        for state in runc_root.iterdir():
            subprocess.run(
                [os.path.join(TESTBED_BIN, "runc"), "--root", str(runc_root), "delete", "--force", state.name],
                check=False,
                capture_output=True,
            )


async def start_shim(tmp: Path, bundle: Path, cid: str, env: dict[str, str]) -> Shim:
    address = f"{tmp}/containerd.sock"
    proc = await asyncio.create_subprocess_exec(
        "containerd-shim-hotrestart-v2",
        "-namespace",
        NAMESPACE,
        "-address",
        address,
        "-publish-binary",
        "/bin/false",
        "-id",
        cid,
        "start",
        cwd=bundle,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err
    assert err == b""
    text = out.decode()
    assert text.startswith("unix:///run/containerd/s/") and "\n" not in text
    assert (bundle / "address").read_text() == text
    client = await Client.connect(text)
    from hotrestart.api.containerd.task.v2 import shim_pb2 as task

    connect = task.ConnectResponse.FromString(
        await client.call(TASK, "Connect", task.ConnectRequest(id=cid), metadata=NS_MD, timeout=30)
    )
    return Shim(client, connect.shim_pid)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


async def wait_gone(pid: int, timeout: float = 10) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if not process_alive(pid):
            return True
        await asyncio.sleep(0.05)
    return False


__all__ = ["EventSink", "Shim", "make_bundle", "process_alive", "signal", "start_shim", "wait_gone"]


@pytest.fixture(scope="session")
def s3_env() -> Iterator[dict[str, str]]:
    """The S3 environment of the test bed's Ceph RADOS Gateway (started on first use)."""
    with objstore.running() as env:
        yield env
