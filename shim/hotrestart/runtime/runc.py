"""The runc command line, built here and nowhere else.

Each public coroutine maps to one runc verb. argv construction is kept in small pure
methods (`*_argv`) so unit tests can check exact command lines without running anything.
Errors carry runc's own last log line (from `--log`, JSON) rather than a bare exit status.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

from hotrestart.errors import NotFoundError, RuntimeCommandError
from hotrestart.runtime.command import CommandRunner, Completed, Stdio

DEFAULT_ROOT = "/run/containerd/runc"


@dataclasses.dataclass(frozen=True, slots=True)
class CheckpointOpts:
    image_path: str
    work_path: str = ""
    parent_path: str = ""
    leave_running: bool = True
    tcp_established: bool = False
    ext_unix_sk: bool = False
    shell_job: bool = False
    file_locks: bool = False
    empty_ns: Sequence[str] = ()
    manage_cgroups_mode: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class RestoreOpts:
    image_path: str
    bundle: str
    pid_file: str
    work_path: str = ""
    parent_path: str = ""
    console_socket: str = ""
    no_pivot: bool = False
    tcp_established: bool = False
    ext_unix_sk: bool = False
    shell_job: bool = False
    file_locks: bool = False
    manage_cgroups_mode: str = ""
    lazy_pages: bool = False  # memory comes from CRIU's lazy-pages daemon in work_path


class RuncArgv:
    """runc command lines for one binary and state root; builds them, runs nothing.

    Used alone where there is no event loop to run them on (the `delete` verb)."""

    def __init__(
        self,
        *,
        binary: str = "runc",
        root: str = DEFAULT_ROOT,
        log_path: str = "",
        systemd_cgroup: bool = False,
        criu: str = "",
    ) -> None:
        self.binary = binary
        self.root = root
        self.log_path = log_path
        self.systemd_cgroup = systemd_cgroup
        self.criu = criu

    def base_argv(self) -> list[str]:
        argv = [self.binary, "--root", self.root]
        if self.log_path:
            argv += ["--log", self.log_path, "--log-format", "json"]
        if self.systemd_cgroup:
            argv.append("--systemd-cgroup")
        if self.criu:
            argv += ["--criu", self.criu]
        return argv

    def create_argv(
        self,
        cid: str,
        bundle: str,
        pid_file: str,
        console_socket: str = "",
        no_pivot: bool = False,
        no_new_keyring: bool = False,
    ) -> list[str]:
        argv = [*self.base_argv(), "create", "--bundle", bundle, "--pid-file", pid_file]
        if console_socket:
            argv += ["--console-socket", console_socket]
        if no_pivot:
            argv.append("--no-pivot")
        if no_new_keyring:
            argv.append("--no-new-keyring")
        return [*argv, cid]

    def exec_argv(self, cid: str, process_json: str, pid_file: str, console_socket: str = "") -> list[str]:
        argv = [*self.base_argv(), "exec", "--process", process_json, "--detach", "--pid-file", pid_file]
        if console_socket:
            argv += ["--console-socket", console_socket]
        return [*argv, cid]

    def kill_argv(self, cid: str, sig: int, all_processes: bool = False) -> list[str]:
        return [*self.base_argv(), "kill", *(["--all"] if all_processes else []), cid, str(sig)]

    def delete_argv(self, cid: str, force: bool = False) -> list[str]:
        return [*self.base_argv(), "delete", *(["--force"] if force else []), cid]

    def simple_argv(self, verb: str, cid: str, *flags: str) -> list[str]:
        return [*self.base_argv(), verb, *flags, cid]

    def checkpoint_argv(self, cid: str, o: CheckpointOpts) -> list[str]:
        argv = [*self.base_argv(), "checkpoint", "--image-path", o.image_path]
        argv += _options(
            ("--work-path", o.work_path),
            ("--parent-path", o.parent_path),
            ("--leave-running", o.leave_running),
            ("--tcp-established", o.tcp_established),
            ("--ext-unix-sk", o.ext_unix_sk),
            ("--shell-job", o.shell_job),
            ("--file-locks", o.file_locks),
        )
        for ns in o.empty_ns:
            argv += ["--empty-ns", ns]
        return [*argv, *_options(("--manage-cgroups-mode", o.manage_cgroups_mode)), cid]

    def restore_argv(self, cid: str, o: RestoreOpts) -> list[str]:
        argv = [*self.base_argv(), "restore", "--detach", "--no-subreaper", "--image-path", o.image_path]
        argv += ["--bundle", o.bundle, "--pid-file", o.pid_file]
        argv += _options(
            ("--work-path", o.work_path),
            ("--parent-path", o.parent_path),
            ("--console-socket", o.console_socket),
            ("--no-pivot", o.no_pivot),
            ("--tcp-established", o.tcp_established),
            ("--ext-unix-sk", o.ext_unix_sk),
            ("--shell-job", o.shell_job),
            ("--file-locks", o.file_locks),
            ("--manage-cgroups-mode", o.manage_cgroups_mode),
            ("--lazy-pages", o.lazy_pages),
        )
        return [*argv, cid]


class Runc(RuncArgv):
    """runc's verbs, run through the shim's command runner."""

    def __init__(
        self,
        runner: CommandRunner,
        *,
        binary: str = "runc",
        root: str = DEFAULT_ROOT,
        log_path: str = "",
        systemd_cgroup: bool = False,
        criu: str = "",
    ) -> None:
        super().__init__(binary=binary, root=root, log_path=log_path, systemd_cgroup=systemd_cgroup, criu=criu)
        self._runner = runner

    async def create(
        self,
        cid: str,
        bundle: str,
        pid_file: str,
        stdio: Stdio,
        *,
        console_socket: str = "",
        no_pivot: bool = False,
        no_new_keyring: bool = False,
    ) -> None:
        await self._check(
            self.create_argv(cid, bundle, pid_file, console_socket, no_pivot, no_new_keyring), stdio=stdio, cwd=bundle
        )

    async def start(self, cid: str) -> None:
        await self._check(self.simple_argv("start", cid))

    async def exec(self, cid: str, process_json: str, pid_file: str, stdio: Stdio, *, console_socket: str = "") -> None:
        await self._check(self.exec_argv(cid, process_json, pid_file, console_socket), stdio=stdio)

    async def kill(self, cid: str, sig: int, *, all_processes: bool = False) -> None:
        await self._check(self.kill_argv(cid, sig, all_processes))

    async def delete(self, cid: str, *, force: bool = False) -> None:
        await self._check(self.delete_argv(cid, force))

    async def pause(self, cid: str) -> None:
        await self._check(self.simple_argv("pause", cid))

    async def resume(self, cid: str) -> None:
        await self._check(self.simple_argv("resume", cid))

    async def update(self, cid: str, resources: dict[str, Any]) -> None:
        await self._check(self.simple_argv("update", cid, "--resources", "-"), input=json.dumps(resources).encode())

    async def ps(self, cid: str) -> list[int]:
        result = await self._check(self.simple_argv("ps", cid, "--format", "json"))
        pids = json.loads(result.stdout or b"[]")
        return [int(p) for p in pids or []]

    async def state(self, cid: str) -> dict[str, Any]:
        result = await self._check(self.simple_argv("state", cid))
        state: dict[str, Any] = json.loads(result.stdout)
        return state

    async def stats(self, cid: str) -> dict[str, Any]:
        result = await self._check(self.simple_argv("events", cid, "--stats"))
        event: dict[str, Any] = json.loads(result.stdout)
        data: dict[str, Any] = event.get("data", {})
        return data

    async def checkpoint(self, cid: str, opts: CheckpointOpts, *, timeout: float | None = None) -> None:
        # Own process group: a timeout must take CRIU down with runc.
        await self._check(self.checkpoint_argv(cid, opts), timeout=timeout, own_group=True)

    async def version(self) -> str:
        result = await self._runner.run([self.binary, "--version"])
        first = result.stdout.decode(errors="replace").splitlines()
        return first[0].split()[-1] if first else ""

    async def restore(self, cid: str, opts: RestoreOpts, stdio: Stdio, *, timeout: float | None = None) -> None:
        await self._check(self.restore_argv(cid, opts), stdio=stdio, cwd=opts.bundle, timeout=timeout, own_group=True)

    # -- plumbing ---------------------------------------------------------------------------

    async def _check(
        self,
        argv: list[str],
        *,
        input: bytes | None = None,
        stdio: Stdio | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        own_group: bool = False,
    ) -> Completed:
        log_offset = _size(self.log_path)
        result = await self._runner.run(argv, input=input, stdio=stdio, cwd=cwd, timeout=timeout, own_group=own_group)
        if result.returncode != 0:
            detail = _last_log_error(self.log_path, log_offset) or _tail(result.stderr) or _tail(result.stdout)
            if "does not exist" in detail or "container not found" in detail.lower():
                raise NotFoundError(detail)
            verb = argv[len(self.base_argv())] if len(argv) > len(self.base_argv()) else ""
            raise RuntimeCommandError(argv, result.returncode, detail, verb)
        return result


def _options(*pairs: tuple[str, str | bool]) -> list[str]:
    """Flags in the order given: a true bool is the flag alone, a non-empty string its value."""
    argv: list[str] = []
    for flag, value in pairs:
        if value is True:
            argv.append(flag)
        elif isinstance(value, str) and value:
            argv += [flag, value]
    return argv


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size if path else 0
    except OSError:
        return 0


def _tail(data: bytes) -> str:
    lines = data.decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else ""


def _last_log_error(path: str, offset: int) -> str:
    """The last error message runc wrote to its JSON log since `offset`."""
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("level") in ("error", "fatal"):
            return str(entry.get("msg", ""))
    return ""
