"""The fake runc behaves like runc for every verb the shim uses, driven through the shim's own Runc."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
from fakes import FakeRunc, eventually, make_bundle, process_alive, python_args

from hotrestart.errors import NotFoundError, RuntimeCommandError
from hotrestart.reaper import Reaper
from hotrestart.runtime.command import Stdio
from hotrestart.runtime.runc import CheckpointOpts, RestoreOpts, Runc


def proc_state(pid: int) -> str:
    """The one-letter scheduler state of `pid` (S, R, T, Z...)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


async def exit_of(reaper: Reaper, pid: int, timeout: float = 5.0) -> int:
    return await asyncio.wait_for(reaper.wait_for(pid), timeout)


async def create_started(runc: Runc, tmp_path: Path, cid: str, args: list[str], stdio: Stdio | None = None) -> int:
    bundle = make_bundle(tmp_path, cid, args)
    await runc.create(cid, str(bundle), str(bundle / "init.pid"), stdio or Stdio())
    await runc.start(cid)
    return int((bundle / "init.pid").read_text())


async def test_version_and_features(fake_runc: FakeRunc, runc: Runc) -> None:
    assert await runc.version() == "1.2.5"
    out = subprocess.run([str(fake_runc.binary), "--version"], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[:3] == ["runc version 1.2.5", "commit: fake", "spec: 1.2.0"]
    features = json.loads(subprocess.check_output([str(fake_runc.binary), "features"]))
    assert features["annotations"]["org.opencontainers.runc.checkpoint.enabled"] == "true"
    assert fake_runc.verbs() == ["version", "version", "features"]


async def test_create_waits_for_start_then_runs(
    fake_runc: FakeRunc, runc: Runc, reaper: Reaper, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    bundle = make_bundle(tmp_path, "c1", ["/bin/sh", "-c", f"touch {marker}; exec sleep 60"])
    await runc.create("c1", str(bundle), str(bundle / "init.pid"), Stdio())
    pid = int((bundle / "init.pid").read_text())
    assert process_alive(pid)
    assert (await runc.state("c1"))["status"] == "created"
    await asyncio.sleep(0.2)
    assert not marker.exists(), "the init ran its process before start"

    await runc.start("c1")
    assert (await runc.state("c1"))["status"] == "running"
    await eventually(marker.exists, what="the process to run")
    with pytest.raises(RuntimeCommandError, match="already running"):
        await runc.start("c1")

    await runc.kill("c1", signal.SIGTERM)
    assert await exit_of(reaper, pid) == 128 + signal.SIGTERM  # re-parented to us, the subreaper
    assert (await runc.state("c1"))["status"] == "stopped"
    with pytest.raises(RuntimeCommandError, match="not running"):
        await runc.kill("c1", signal.SIGTERM)
    await runc.delete("c1")
    assert not fake_runc.exists("c1")
    with pytest.raises(NotFoundError, match="does not exist"):
        await runc.state("c1")

    create = fake_runc.calls()[0]
    assert create[:5] == ["--root", str(fake_runc.root), "--log", runc.log_path, "--log-format"]
    assert fake_runc.verbs() == [
        "create",
        "state",
        "start",
        "state",
        "start",
        "kill",
        "state",
        "kill",
        "delete",
        "state",
    ]


async def test_processes_inherit_stdio(runc: Runc, reaper: Reaper, tmp_path: Path) -> None:
    with tempfile.TemporaryFile() as out:
        pid = await create_started(
            runc, tmp_path, "c1", ["/bin/sh", "-c", "echo from-init; exit 7"], Stdio(stdout=out.fileno())
        )
        assert await exit_of(reaper, pid) == 7
        out.seek(0)
        assert out.read() == b"from-init\n"


async def test_requested_failure_is_logged_like_runc(fake_runc: FakeRunc, runc: Runc, tmp_path: Path) -> None:
    fake_runc.fail("create", "unable to apply cgroup configuration: no space left", code=3)
    bundle = make_bundle(tmp_path, "c1", ["sleep", "60"])
    with pytest.raises(RuntimeCommandError) as info:
        await runc.create("c1", str(bundle), str(bundle / "init.pid"), Stdio())
    assert info.value.returncode == 3
    assert info.value.detail == "unable to apply cgroup configuration: no space left"
    assert "runc create failed (exit 3)" in str(info.value)
    last = json.loads(Path(runc.log_path).read_text().splitlines()[-1])
    assert last["level"] == "error"
    assert not fake_runc.exists("c1") and not (bundle / "init.pid").exists()

    fake_runc.clear("create")
    await runc.create("c1", str(bundle), str(bundle / "init.pid"), Stdio())
    assert fake_runc.exists("c1")
    await runc.delete("c1", force=True)


async def test_missing_executable_fails_create(runc: Runc, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, "c1", ["no-such-program"])
    with pytest.raises(RuntimeCommandError, match='exec: "no-such-program": executable file not found'):
        await runc.create("c1", str(bundle), str(bundle / "init.pid"), Stdio())


def test_unknown_flags_are_refused(fake_runc: FakeRunc) -> None:
    """So that a command line the shim builds wrongly fails here as it would with runc."""
    run = subprocess.run(
        [str(fake_runc.binary), "--root", str(fake_runc.root), "delete", "--bogus", "c1"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1 and "flag provided but not defined: --bogus" in run.stderr


async def test_delay_lets_a_call_be_cancelled(fake_runc: FakeRunc, runc: Runc, tmp_path: Path) -> None:
    fake_runc.delay("start", 30)
    bundle = make_bundle(tmp_path, "c1", ["sleep", "60"])
    await runc.create("c1", str(bundle), str(bundle / "init.pid"), Stdio())
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.5):
            await runc.start("c1")
    assert loop.time() - began < 5
    assert (await runc.state("c1"))["status"] == "created"
    await runc.delete("c1", force=True)


async def test_exec_ps_and_kill_all(fake_runc: FakeRunc, runc: Runc, reaper: Reaper, tmp_path: Path) -> None:
    init = await create_started(runc, tmp_path, "c1", ["sleep", "60"])
    spec = tmp_path / "process.json"
    spec.write_text(json.dumps({"args": ["sleep", "61"], "cwd": "/"}))
    with tempfile.TemporaryFile() as out:
        await runc.exec("c1", str(spec), str(tmp_path / "exec.pid"), Stdio(stdout=out.fileno()))
    exec_pid = int((tmp_path / "exec.pid").read_text())
    assert sorted(await runc.ps("c1")) == sorted([init, exec_pid])
    assert "--detach" in fake_runc.calls()[-2]

    await runc.kill("c1", signal.SIGKILL, all_processes=True)
    assert await exit_of(reaper, init) == 128 + signal.SIGKILL
    assert await exit_of(reaper, exec_pid) == 128 + signal.SIGKILL
    assert await runc.ps("c1") == []
    await runc.delete("c1")


async def test_exec_refused_unless_running(runc: Runc, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, "c1", ["sleep", "60"])
    await runc.create("c1", str(bundle), str(bundle / "init.pid"), Stdio())
    spec = tmp_path / "process.json"
    spec.write_text(json.dumps({"args": ["true"]}))
    with pytest.raises(RuntimeCommandError, match="stopped container"):
        await runc.exec("c1", str(spec), str(tmp_path / "exec.pid"), Stdio())
    await runc.delete("c1", force=True)


async def test_pause_and_resume_stop_and_continue_the_processes(runc: Runc, tmp_path: Path) -> None:
    pid = await create_started(runc, tmp_path, "c1", ["sleep", "60"])
    await runc.pause("c1")
    assert (await runc.state("c1"))["status"] == "paused"
    assert proc_state(pid) == "T"
    with pytest.raises(RuntimeCommandError, match="cannot delete container c1 that is not stopped: paused"):
        await runc.delete("c1")
    await runc.resume("c1")
    assert (await runc.state("c1"))["status"] == "running"
    assert proc_state(pid) in ("S", "R")
    with pytest.raises(RuntimeCommandError, match="not paused"):
        await runc.resume("c1")
    await runc.delete("c1", force=True)
    assert not process_alive(pid)


async def test_update_and_stats(fake_runc: FakeRunc, runc: Runc, tmp_path: Path) -> None:
    await create_started(runc, tmp_path, "c1", ["sleep", "60"])
    await runc.update("c1", {"memory": {"limit": 1 << 28}})
    assert fake_runc.state("c1")["resources"] == {"memory": {"limit": 1 << 28}}
    stats = await runc.stats("c1")
    assert stats["pids"]["current"] == 1 and stats["memory"]["usage"]["usage"] > 0
    await runc.delete("c1", force=True)


async def test_checkpoint_ends_the_container_unless_left_running(
    fake_runc: FakeRunc, runc: Runc, reaper: Reaper, tmp_path: Path
) -> None:
    pid = await create_started(runc, tmp_path, "c1", ["sleep", "60"])
    kept = tmp_path / "kept"
    await runc.checkpoint("c1", CheckpointOpts(image_path=str(kept), work_path=str(tmp_path / "work")))
    assert {p.name for p in kept.iterdir()} == {"inventory.img", "pstree.img", "pages-1.img"}
    assert (tmp_path / "work" / "dump.log").exists()
    assert process_alive(pid)

    ended = tmp_path / "ended"
    await runc.checkpoint("c1", CheckpointOpts(image_path=str(ended), leave_running=False))
    assert (ended / "pages-1.img").stat().st_size > 0
    assert await exit_of(reaper, pid) == 128 + signal.SIGKILL
    assert not fake_runc.exists("c1")


async def test_restore_starts_a_new_process(fake_runc: FakeRunc, runc: Runc, reaper: Reaper, tmp_path: Path) -> None:
    pid = await create_started(runc, tmp_path, "c1", python_args("import time; time.sleep(60)"))
    images = tmp_path / "images"
    await runc.checkpoint("c1", CheckpointOpts(image_path=str(images), leave_running=False))
    await exit_of(reaper, pid)

    bundle = make_bundle(tmp_path / "restored", "c1", ["sleep", "60"])
    pid_file = bundle / "init.pid"
    with pytest.raises(RuntimeCommandError, match=r"no inventory\.img"):
        await runc.restore("c1", RestoreOpts(str(tmp_path / "nothing"), str(bundle), str(pid_file)), Stdio())
    await runc.restore("c1", RestoreOpts(str(images), str(bundle), str(pid_file)), Stdio())
    restored = int(pid_file.read_text())
    assert restored != pid and process_alive(restored)
    assert (await runc.state("c1"))["status"] == "running"
    assert fake_runc.state("c1")["restored_from"] == str(images)
    await runc.kill("c1", signal.SIGKILL)
    assert await exit_of(reaper, restored) == 128 + signal.SIGKILL
    await runc.delete("c1")


def test_never_touches_the_default_root(fake_runc: FakeRunc) -> None:
    run = subprocess.run([str(fake_runc.binary), "state", "c1"], capture_output=True, text=True)
    assert run.returncode == 1 and "needs --root" in run.stderr
    assert not os.path.exists("/run/runc/c1")
