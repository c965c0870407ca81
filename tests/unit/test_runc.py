"""runc command lines, checked by running a fake `runc` that records its argv."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path

import pytest

from hotrestart.errors import NotFoundError, RuntimeCommandError
from hotrestart.reaper import Reaper
from hotrestart.runtime.command import CommandRunner
from hotrestart.runtime.runc import CheckpointOpts, RestoreOpts, Runc, RuncArgv

FAKE = """#!/bin/sh
printf '%s\\n' "$@" > "{record}"
case " $* " in
  *" ps "*) echo '[1, 23]' ;;
  *" state "*) echo '{{"status": "running", "pid": 1}}' ;;
  *" update "*) cat > "{record}.stdin" ;;
  *" kill "*) log=""; while [ $# -gt 0 ]; do [ "$1" = --log ] && log=$2; shift; done
      echo '{{"level":"error","msg":"container does not exist"}}' >> "$log"; exit 1 ;;
  *" pause "*) echo "plain failure" >&2; exit 2 ;;
esac
exit 0
"""


@pytest.fixture
async def runc(tmp_path: Path) -> tuple[Runc, Path]:
    record = tmp_path / "argv"
    script = tmp_path / "runc"
    script.write_text(FAKE.format(record=record))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    reaper = Reaper()
    reaper.install(asyncio.get_running_loop())
    return Runc(
        CommandRunner(reaper), binary=str(script), root="/run/r/k8s.io", log_path=str(tmp_path / "log.json")
    ), record


def argv(record: Path) -> list[str]:
    return record.read_text().splitlines()


async def test_base_flags_and_ps(runc: tuple[Runc, Path]) -> None:
    r, record = runc
    assert await r.ps("c1") == [1, 23]
    assert argv(record) == [
        "--root",
        "/run/r/k8s.io",
        "--log",
        r.log_path,
        "--log-format",
        "json",
        "ps",
        "--format",
        "json",
        "c1",
    ]


async def test_update_sends_resources_on_stdin(runc: tuple[Runc, Path]) -> None:
    r, record = runc
    await r.update("c1", {"memory": {"limit": 1024}})
    assert argv(record)[-3:] == ["--resources", "-", "c1"]
    assert json.loads(Path(f"{record}.stdin").read_text()) == {"memory": {"limit": 1024}}


async def test_errors_carry_runc_log_line(runc: tuple[Runc, Path]) -> None:
    r, _ = runc
    with pytest.raises(NotFoundError, match="does not exist"):
        await r.kill("c1", 15, all_processes=True)
    with pytest.raises(RuntimeCommandError, match="runc pause failed \\(exit 2\\): plain failure"):
        await r.pause("c1")


def test_create_exec_kill_argv() -> None:
    r = Runc(CommandRunner(Reaper()), binary="runc", root="/x")
    assert r.create_argv("c", "/b", "/b/init.pid", console_socket="/s", no_pivot=True) == [
        "runc",
        "--root",
        "/x",
        "create",
        "--bundle",
        "/b",
        "--pid-file",
        "/b/init.pid",
        "--console-socket",
        "/s",
        "--no-pivot",
        "c",
    ]
    assert r.exec_argv("c", "/p.json", "/e.pid") == [
        "runc",
        "--root",
        "/x",
        "exec",
        "--process",
        "/p.json",
        "--detach",
        "--pid-file",
        "/e.pid",
        "c",
    ]
    assert r.kill_argv("c", 9, True) == ["runc", "--root", "/x", "kill", "--all", "c", "9"]
    assert r.delete_argv("c", force=True) == ["runc", "--root", "/x", "delete", "--force", "c"]


def test_command_lines_need_no_runner() -> None:
    # What the `delete` verb uses, with no event loop to run commands on.
    argv = RuncArgv(binary="/opt/runc", root="/r/k8s.io")
    assert argv.delete_argv("c", force=True) == ["/opt/runc", "--root", "/r/k8s.io", "delete", "--force", "c"]


def test_checkpoint_and_restore_argv() -> None:
    r = Runc(CommandRunner(Reaper()), binary="runc", root="/x", systemd_cgroup=True)
    opts = CheckpointOpts(
        image_path="/img",
        work_path="/w",
        leave_running=True,
        tcp_established=True,
        ext_unix_sk=True,
        shell_job=True,
        file_locks=True,
        empty_ns=("network",),
        manage_cgroups_mode="soft",
    )
    assert r.checkpoint_argv("c", opts) == [
        "runc",
        "--root",
        "/x",
        "--systemd-cgroup",
        "checkpoint",
        "--image-path",
        "/img",
        "--work-path",
        "/w",
        "--leave-running",
        "--tcp-established",
        "--ext-unix-sk",
        "--shell-job",
        "--file-locks",
        "--empty-ns",
        "network",
        "--manage-cgroups-mode",
        "soft",
        "c",
    ]
    assert "--leave-running" not in r.checkpoint_argv("c", CheckpointOpts(image_path="/i", leave_running=False))
    restore = RestoreOpts(
        image_path="/img", bundle="/b", pid_file="/b/init.pid", console_socket="/s", tcp_established=True
    )
    assert r.restore_argv("c", restore) == [
        "runc",
        "--root",
        "/x",
        "--systemd-cgroup",
        "restore",
        "--detach",
        "--no-subreaper",
        "--image-path",
        "/img",
        "--bundle",
        "/b",
        "--pid-file",
        "/b/init.pid",
        "--console-socket",
        "/s",
        "--tcp-established",
        "c",
    ]


async def test_reaper_hands_exit_codes_and_survives_early_exits(tmp_path: Path) -> None:
    reaper = Reaper()
    reaper.install(asyncio.get_running_loop())
    runner = CommandRunner(reaper)
    result = await runner.run(["/bin/sh", "-c", "echo out; echo err >&2; exit 4"])
    assert (result.returncode, result.stdout, result.stderr) == (4, b"out\n", b"err\n")
    killed = await runner.run(["/bin/sh", "-c", "kill -9 $$"])
    assert killed.returncode == 137
    # A child that exits before anyone waits for it is still reported.
    pid = os.fork()
    if pid == 0:
        os._exit(9)
    await asyncio.sleep(0.1)
    assert await asyncio.wait_for(reaper.wait_for(pid), 5) == 9
