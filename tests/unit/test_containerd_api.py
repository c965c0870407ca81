"""container_labels without containerd: its arguments, its caps and the failures that need
no containerd to happen (no socket, a peer that never answers or hangs up)."""

from __future__ import annotations

import asyncio
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import hotrestart
from hotrestart.api.containerd.services.containers.v1 import containers_pb2 as pb
from hotrestart.errors import ContainerdAPIError, ShimError
from hotrestart.workload import containerd_api
from hotrestart.workload.containerd_api import MAX_LABEL_BYTES, MAX_LABELS, container_labels

SANDBOX = "3f4a" * 16


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # tmp_path can be too long for a unix socket address.
    with tempfile.TemporaryDirectory(prefix="cd-api-", dir="/tmp") as d:
        yield Path(d)


def ld(tag: int, payload: bytes) -> bytes:
    """A length-delimited field: tag, varint length, payload."""
    n, length = len(payload), b""
    while n >= 0x80:
        length += bytes([n & 0x7F | 0x80])
        n >>= 7
    return bytes([tag]) + length + bytes([n]) + payload


def test_get_request_bytes() -> None:
    assert pb.GetContainerRequest(id="abc").SerializeToString() == ld(0x0A, b"abc")


def test_a_container_as_containerd_sends_it_parses() -> None:
    # containerd's Container: id 1, labels 2, image 3, runtime 4, spec 5 (Any), ..., sandbox 11;
    # the fields not declared here must be skipped, not misread.
    container = (
        ld(0x0A, b"sb1")
        + ld(0x12, ld(0x0A, b"app") + ld(0x12, b"web"))
        + ld(0x12, ld(0x0A, b"io.cri-containerd.kind") + ld(0x12, b"sandbox"))
        + ld(0x1A, b"registry.k8s.io/pause:3.10")
        + ld(0x22, ld(0x0A, b"io.containerd.runc.v2"))
        + ld(0x2A, ld(0x0A, b"types.containerd.io/opencontainers/runtime-spec/1/Spec") + ld(0x12, b"{}"))
        + ld(0x5A, b"sb1")
    )
    got = pb.GetContainerResponse.FromString(ld(0x0A, container)).container
    assert got.id == "sb1"
    assert dict(got.labels) == {"app": "web", "io.cri-containerd.kind": "sandbox"}


def test_the_error_is_a_shim_error() -> None:
    assert issubclass(ContainerdAPIError, ShimError)


def test_importing_the_module_does_not_import_grpc() -> None:
    code = "import sys, hotrestart.workload.containerd_api; sys.exit(2 if 'grpc' in sys.modules else 0)"
    package_root = str(Path(hotrestart.__file__).parent.parent)  # this copy, installed or not
    env = {**os.environ, "PYTHONPATH": package_root}
    assert subprocess.run([sys.executable, "-c", code], check=False, timeout=60, env=env).returncode == 0


@pytest.mark.parametrize("address", ["", "unix://", "tcp://127.0.0.1:1234", "unix://tcp://x", "/run/c\0.sock"])
async def test_an_address_that_is_no_socket_path_is_refused(address: str) -> None:
    with pytest.raises(ContainerdAPIError, match="not a unix socket path"):
        await container_labels(address, "k8s.io", SANDBOX)


@pytest.mark.parametrize("namespace", ["", "k8s io", "k8s.io\n", "-k8s", "k8s..io", "é", "a" * 77])
async def test_a_namespace_that_is_no_identifier_is_refused(namespace: str) -> None:
    with pytest.raises(ContainerdAPIError, match=r"namespace .* is not a containerd identifier"):
        await container_labels("/run/containerd/containerd.sock", namespace, SANDBOX)


@pytest.mark.parametrize("container_id", ["", "../x", "a/b", "id\x00", "a" * 77])
async def test_a_container_id_that_is_no_identifier_is_refused(container_id: str) -> None:
    with pytest.raises(ContainerdAPIError, match=r"container id .* is not a containerd identifier"):
        await container_labels("/run/containerd/containerd.sock", "k8s.io", container_id)


@pytest.mark.parametrize("timeout", [0, -1.0, math.nan, math.inf, 61.0])
async def test_a_timeout_out_of_range_is_refused(timeout: float) -> None:
    with pytest.raises(ContainerdAPIError, match="timeout must be"):
        await container_labels("/run/containerd/containerd.sock", "k8s.io", SANDBOX, timeout=timeout)


@pytest.mark.parametrize("prefix", ["", "unix://"])
async def test_a_missing_socket_fails_at_once(sock_dir: Path, prefix: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(ContainerdAPIError, match=r"cannot reach containerd at .*/c\.sock: No such file"):
        await container_labels(f"{prefix}{sock_dir}/c.sock", "k8s.io", SANDBOX, timeout=5)
    assert time.monotonic() - t0 < 1


async def test_a_file_that_is_no_socket_is_refused(sock_dir: Path) -> None:
    (sock_dir / "c.sock").write_text("")
    with pytest.raises(ContainerdAPIError, match="not a socket"):
        await container_labels(str(sock_dir / "c.sock"), "k8s.io", SANDBOX)


async def test_a_socket_nobody_serves_is_unreachable(sock_dir: Path) -> None:
    # A socket file left behind by a containerd that is gone: connect() is refused.
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock_dir / "c.sock"))
    s.close()
    t0 = time.monotonic()
    with pytest.raises(ContainerdAPIError, match="cannot reach containerd at"):
        await container_labels(str(sock_dir / "c.sock"), "k8s.io", SANDBOX, timeout=5)
    assert time.monotonic() - t0 < 4


async def test_a_socket_that_never_answers_gives_the_deadline_error(sock_dir: Path) -> None:
    # Listening without ever accepting: the kernel completes the connection, nobody speaks.
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock_dir / "c.sock"))
        s.listen(8)
        t0 = time.monotonic()
        with pytest.raises(ContainerdAPIError, match=r"did not answer within 0\.5s"):
            await container_labels(f"unix://{sock_dir}/c.sock", "k8s.io", SANDBOX, timeout=0.5)
        elapsed = time.monotonic() - t0
    assert 0.4 < elapsed < 3, elapsed


async def test_a_peer_that_hangs_up_is_unreachable(sock_dir: Path) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_unix_server(hang_up, path=str(sock_dir / "c.sock"))
    async with server:
        t0 = time.monotonic()
        with pytest.raises(ContainerdAPIError, match="cannot reach containerd at"):
            await container_labels(str(sock_dir / "c.sock"), "k8s.io", SANDBOX, timeout=5)
        assert time.monotonic() - t0 < 4


def test_labels_up_to_the_caps_pass() -> None:
    labels = {f"k{i}": "v" for i in range(MAX_LABELS)}
    assert containerd_api._checked_labels(labels, SANDBOX) == labels
    value = "v" * (MAX_LABEL_BYTES - 1)
    assert containerd_api._checked_labels({"k": value}, SANDBOX) == {"k": value}


def test_one_label_too_many_is_an_error_not_a_truncation() -> None:
    labels = {f"k{i}": "v" for i in range(MAX_LABELS + 1)}
    with pytest.raises(ContainerdAPIError, match=f"has {MAX_LABELS + 1} labels, more than {MAX_LABELS}"):
        containerd_api._checked_labels(labels, SANDBOX)


def test_labels_over_the_size_cap_are_an_error() -> None:
    # Counted in UTF-8 bytes: a multibyte value fills the cap sooner than its length says.
    value = "é" * (MAX_LABEL_BYTES // 2)
    with pytest.raises(ContainerdAPIError, match=f"take {MAX_LABEL_BYTES + 1} bytes, more than {MAX_LABEL_BYTES}"):
        containerd_api._checked_labels({"k": value}, SANDBOX)


async def test_without_grpcio_the_error_says_so(sock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "grpc", None)  # import grpc now raises ImportError
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock_dir / "c.sock"))
        s.listen(1)
        with pytest.raises(ContainerdAPIError, match="the grpcio package is needed"):
            await container_labels(str(sock_dir / "c.sock"), "k8s.io", SANDBOX)
