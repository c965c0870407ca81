"""Run an external command without blocking the event loop and without a second reaper.

Output goes to anonymous temporary files rather than pipes: commands such as
`runc create --detach` leave grandchildren holding inherited descriptors, and a pipe would
then never reach end-of-file.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence

from hotrestart.reaper import Reaper


@dataclasses.dataclass(frozen=True, slots=True)
class Completed:
    argv: list[str]
    returncode: int
    stdout: bytes
    stderr: bytes


@dataclasses.dataclass(slots=True)
class Stdio:
    """Descriptors handed to the command as its stdin, stdout and stderr (None: our own files)."""

    stdin: int | None = None
    stdout: int | None = None
    stderr: int | None = None


class CommandRunner:
    def __init__(self, reaper: Reaper) -> None:
        self._reaper = reaper

    async def run(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        stdio: Stdio | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        pass_fds: Sequence[int] = (),
        timeout: float | None = None,
        own_group: bool = False,
    ) -> Completed:
        """Run `argv` to completion. With `own_group`, it gets a process group of its own and
        a timeout or cancellation kills the whole group (runc's CRIU child included)."""
        argv = list(argv)
        stdio = stdio or Stdio()
        with contextlib.ExitStack() as stack:
            out = stack.enter_context(tempfile.TemporaryFile()) if stdio.stdout is None else None
            err = stack.enter_context(tempfile.TemporaryFile()) if stdio.stderr is None else None
            stdin: int | None = stdio.stdin
            if input is not None:
                infile = stack.enter_context(tempfile.TemporaryFile())
                infile.write(input)
                infile.seek(0)
                stdin = infile.fileno()
            started = time.monotonic()
            proc = subprocess.Popen(
                argv,
                stdin=stdin if stdin is not None else subprocess.DEVNULL,
                stdout=stdio.stdout if out is None else out,
                stderr=stdio.stderr if err is None else err,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                pass_fds=tuple(pass_fds),
                close_fds=True,
                start_new_session=own_group,
            )
            exited = self._reaper.wait_for(proc.pid, since=started)
            try:
                async with asyncio.timeout(timeout):
                    code = await asyncio.shield(exited)
            except (TimeoutError, asyncio.CancelledError):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    if own_group:
                        os.killpg(proc.pid, signal.SIGKILL)
                    else:
                        os.kill(proc.pid, signal.SIGKILL)
                code = await exited
                proc.returncode = code
                raise
            # Popen must not try to wait for a pid the reaper already collected.
            proc.returncode = code
            stdout = _read_all(out)
            stderr = _read_all(err)
        return Completed(argv, code, stdout, stderr)


def _read_all(f: object) -> bytes:
    if f is None:
        return b""
    assert hasattr(f, "seek") and hasattr(f, "read")
    f.seek(0)
    data: bytes = f.read()
    return data
