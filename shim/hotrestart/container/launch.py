"""Running the runc verbs that leave a process behind (create, restore, exec).

Each hands runc the process's stdio, takes the pty's master when the process has a
terminal, and reads the pid runc wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Awaitable, Callable
from typing import Any

from hotrestart.container.stdio import ConsoleIO, ProcessIO
from hotrestart.errors import FailedPreconditionError


async def launch(io: ProcessIO, run: Callable[[str], Awaitable[None]], pid_file: str) -> int:
    """`run(console_socket)` the verb; the new process's pid once its stdio is wired."""
    receive = asyncio.ensure_future(io.receive_master()) if isinstance(io, ConsoleIO) else None
    try:
        await run(io.console_socket)
        if receive is not None:
            await receive
    except BaseException:
        if receive is not None:
            receive.cancel()
            with contextlib.suppress(BaseException):
                await receive
        raise
    await io.started()
    return read_pid(pid_file)


def exec_spec_path(bundle: str, exec_id: str) -> str:
    return os.path.join(bundle, f".exec-{exec_id}.json")


def exec_pid_path(bundle: str, exec_id: str) -> str:
    return os.path.join(bundle, f".exec-{exec_id}.pid")


def write_exec_spec(bundle: str, exec_id: str, spec: dict[str, Any]) -> None:
    fd = os.open(exec_spec_path(bundle, exec_id), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(spec, f)


def read_pid(path: str) -> int:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError) as exc:
        raise FailedPreconditionError(f"runc left no usable pid file {path}: {exc}") from exc
