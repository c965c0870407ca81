"""The `delete` verb: cleans up after a shim that is gone, with the runc it last used."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from hotrestart.api.containerd.task.v2 import shim_pb2
from hotrestart.handoff import INIT_PID_FILE, OPTIONS_FILE

SHIM = Path(__file__).resolve().parents[2] / "shim"


def _delete(bundle: Path, **env_vars: str) -> subprocess.CompletedProcess[bytes]:
    argv = [sys.executable, "-m", "hotrestart.shim_main", "-namespace", "k8s.io", "-id", "c1", "-bundle", str(bundle)]
    env = dict(os.environ, PYTHONPATH=str(SHIM), **env_vars)
    return subprocess.run([*argv, "delete"], capture_output=True, env=env, cwd=bundle, check=True, timeout=30)


def test_delete_runs_the_saved_runc_and_reports_a_kill(tmp_path: Path) -> None:
    record = tmp_path / "argv"
    runc = tmp_path / "my-runc"
    runc.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {record}\necho 'container gone' >&2\nexit 1\n")
    runc.chmod(runc.stat().st_mode | stat.S_IEXEC)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / OPTIONS_FILE).write_text(json.dumps({"binary_name": str(runc), "root": "/run/r"}))
    (bundle / INIT_PID_FILE).write_text("4242\n")

    done = _delete(bundle)

    assert record.read_text().splitlines() == ["--root", "/run/r/k8s.io", "delete", "--force", "c1"]
    assert b"container gone" in done.stderr
    reply = shim_pb2.DeleteResponse.FromString(done.stdout)
    assert (reply.pid, reply.exit_status) == (4242, 137)


def test_delete_answers_with_malformed_options_and_no_runc(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / OPTIONS_FILE).write_text("[1, 2]")
    done = _delete(bundle, PATH=str(tmp_path))  # the default "runc" is nowhere on this PATH
    assert b"runc delete:" in done.stderr
    reply = shim_pb2.DeleteResponse.FromString(done.stdout)
    assert (reply.pid, reply.exit_status) == (0, 137)
