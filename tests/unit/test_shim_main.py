"""The shim's entry point: what it takes from containerd's environment."""

from __future__ import annotations

import os

import pytest

from hotrestart import shim_main


def test_containerds_notify_socket_is_not_passed_on(monkeypatch: pytest.MonkeyPatch) -> None:
    # containerd under systemd (Type=notify) hands its NOTIFY_SOCKET to every shim; runc
    # would bind a notify proxy for the container and fail on the socket path's length.
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    shim_main.main(["-v"])
    assert "NOTIFY_SOCKET" not in os.environ
