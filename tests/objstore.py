"""The test bed's object store: a real single-node Ceph with its RADOS Gateway (hack/object-store.sh)."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "hack" / "object-store.sh"
DATA = Path(os.environ.get("HOTRESTART_OBJSTORE_DIR", "/var/lib/hotrestart-objstore"))


def _parse(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))


@contextlib.contextmanager
def running() -> Iterator[dict[str, str]]:
    """The gateway's S3 environment, starting the cluster when it is not up (and stopping
    it again afterwards only then)."""
    if os.geteuid() != 0:
        pytest.skip("the object store test bed runs as root")
    before = subprocess.run(["bash", str(SCRIPT), "env"], capture_output=True, text=True)
    up = subprocess.run(["bash", str(SCRIPT), "up"], capture_output=True, text=True, timeout=900)
    if up.returncode != 0:
        message = f"hack/object-store.sh up failed:\n{up.stderr[-4000:]}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield _parse(up.stdout)
    finally:
        if before.returncode != 0:
            subprocess.run(["bash", str(SCRIPT), "down"], capture_output=True, timeout=300)


def fresh_url(env: dict[str, str]) -> str:
    """A store URL of its own below the test bed's bucket."""
    return f"{env['HOTRESTART_STORE']}/t-{secrets.token_hex(4)}"


def gateway_pid() -> int:
    return int((DATA / "run" / "client.rgw.x.pid").read_text().strip())


@contextlib.contextmanager
def gateway_stopped() -> Iterator[None]:
    """The gateway frozen (SIGSTOP): connections are accepted by the kernel and never
    answered, as with a gateway that hangs or a network that drops everything."""
    pid = gateway_pid()
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)
