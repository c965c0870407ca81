"""Spans reach the collector however the shim exits, and an absent collector cannot hold the exit."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SHIM = Path(__file__).resolve().parents[2] / "shim"


class _Collector(http.server.ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.bodies: list[bytes] = []

    @property
    def endpoint(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def received(self, needle: bytes, deadline: float) -> bool:
        while time.monotonic() < deadline:
            if any(needle in body for body in self.bodies):
                return True
            time.sleep(0.05)
        return False


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Collector

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.bodies.append(body)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[_Collector]:
    server = _Collector()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _env(endpoint: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(
        PYTHONPATH=str(SHIM),
        OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
        # Nothing is exported on the batch timer: only a flush at exit can deliver the span.
        OTEL_BSP_SCHEDULE_DELAY="600000",
    )
    return env


def test_shim_forked_from_the_zygote_exports_its_spans(collector: _Collector, tmp_path: Path) -> None:
    # The zygote's own fork path, with a stand-in daemon that records one span and returns.
    script = textwrap.dedent(
        """
        import socket, sys, types

        from hotrestart import telemetry, zygote

        def serve_socket(flags, sock):
            with telemetry.span("hotrestart.test.forked"):
                pass

        daemon = types.ModuleType("hotrestart.daemon")
        daemon.serve_socket = serve_socket
        sys.modules["hotrestart.daemon"] = daemon
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        fields = {"cwd": sys.argv[1], "namespace": "ns", "address": "", "id": "pod"}
        zygote._become_shim(listener, sock, fields, {})
        """
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=_env(collector.endpoint), check=True, timeout=30)
    assert collector.received(b"hotrestart.test.forked", time.monotonic() + 15)


def test_normal_exit_exports_spans(collector: _Collector) -> None:
    script = "from hotrestart import telemetry\nwith telemetry.span('hotrestart.test.exit'):\n    pass\n"
    subprocess.run([sys.executable, "-c", script], env=_env(collector.endpoint), check=True, timeout=30)
    assert collector.received(b"hotrestart.test.exit", time.monotonic() + 5)


def test_shutdown_is_bounded_when_the_collector_never_answers() -> None:
    # A socket that accepts connections (the kernel's backlog) but never replies.
    silent = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        port = silent.getsockname()[1]
        script = (
            "import time\nfrom hotrestart import telemetry\n"
            "with telemetry.span('hotrestart.test.stuck'):\n    pass\n"
            "start = time.monotonic()\ntelemetry.shutdown(timeout=1.0)\n"
            "print(time.monotonic() - start)\n"
        )
        env = _env(f"http://127.0.0.1:{port}")
        started = time.monotonic()
        out = subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=30, capture_output=True)
        assert float(out.stdout) < 2.0
        # The exit hook finds nothing left to do: the whole process ends promptly too.
        assert time.monotonic() - started < 10
    finally:
        silent.close()


def test_shutdown_without_tracing_is_a_no_op() -> None:
    from hotrestart import telemetry

    telemetry.shutdown()
    telemetry.shutdown()
