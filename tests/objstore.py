"""The test bed's object store for the tests: started on first use, stopped at the end when
the tests started it (hack/testbed/objectstore.py)."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
from collections.abc import Iterator

import pytest

from testbed import objectstore

gateway_pid = objectstore.gateway_pid


@contextlib.contextmanager
def running() -> Iterator[dict[str, str]]:
    if os.geteuid() != 0:
        pytest.skip("the object store test bed runs as root")
    was_up = objectstore.running_env() is not None
    try:
        env = objectstore.up()
    except (objectstore.ObjectStoreError, OSError) as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    try:
        yield env
    finally:
        if not was_up:
            objectstore.down()


def fresh_url(env: dict[str, str]) -> str:
    """A store URL of its own below the test bed's bucket."""
    return f"{env['HOTRESTART_STORE']}/t-{secrets.token_hex(4)}"


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
