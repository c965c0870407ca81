"""Container processes: the spec they run and the fork that starts them (after the exec FIFO, if any)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from typing import Any

from .errors import RuncError
from .state import start_time


def process_spec(process: dict[str, Any]) -> tuple[list[str], dict[str, str], str]:
    args = [str(a) for a in process.get("args") or []]
    if not args:
        raise RuncError("args must not be empty")
    env = dict(e.split("=", 1) for e in process.get("env") or [] if "=" in e)
    env.setdefault("PATH", os.environ.get("PATH", "/usr/bin:/bin"))
    if shutil.which(args[0], path=env["PATH"]) is None:
        raise RuncError(
            f'runc create failed: unable to start container process: exec: "{args[0]}": '
            "executable file not found in $PATH"
        )
    return args, env, str(process.get("cwd") or "")


def _close_inherited_fds() -> None:
    for name in os.listdir("/proc/self/fd"):
        if int(name) > 2:
            with contextlib.suppress(OSError):
                os.close(int(name))


def spawn(args: list[str], env: dict[str, str], cwd: str, fifo: str = "") -> dict[str, Any]:
    """Fork a process that (after the exec FIFO, if given) becomes `args`; it keeps our stdio."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 127
        try:
            _close_inherited_fds()  # the root's lock above all: a waiting init must not hold it
            os.setsid()
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE):
                signal.signal(sig, signal.SIG_DFL)
            if fifo:
                fd = os.open(fifo, os.O_WRONLY)  # blocks until `start` opens the other end
                os.write(fd, b"0")
                os.close(fd)
            if cwd:
                os.chdir(cwd)
            os.execvpe(args[0], args, env)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.write(2, f"fake runc: {args[0]}: {exc}\n".encode())
        finally:
            os._exit(code)
    return {"pid": pid, "start": start_time(pid)}


def read_spec(bundle: str) -> dict[str, Any]:
    try:
        with open(os.path.join(bundle, "config.json")) as f:
            spec: dict[str, Any] = json.load(f)
    except FileNotFoundError:
        raise RuncError(f"JSON specification file config.json not found in {bundle}") from None
    return spec
