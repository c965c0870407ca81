"""Containers' state as files under `--root`, and the liveness of their processes."""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

from .cli import Call
from .errors import RuncError


def container_dir(root: str, cid: str) -> str:
    if not cid or "/" in cid or cid in (".", ".."):
        raise RuncError(f"invalid container id {cid!r}")
    return os.path.join(root, cid)


def load(root: str, cid: str) -> dict[str, Any]:
    try:
        with open(os.path.join(container_dir(root, cid), "state.json")) as f:
            state: dict[str, Any] = json.load(f)
    except FileNotFoundError:
        raise RuncError("container does not exist") from None
    state["status"] = _status(state)
    return state


def save(root: str, state: dict[str, Any]) -> None:
    path = os.path.join(container_dir(root, state["id"]), "state.json")
    with open(path + ".tmp", "w") as f:
        json.dump(state, f)
    os.replace(path + ".tmp", path)


def start_time(pid: int) -> str:
    """The process's start time in clock ticks ("" if it is gone or a zombie): tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return ""
    return "" if fields[0] in ("Z", "X") else fields[19]


def alive(proc: dict[str, Any]) -> bool:
    return bool(proc["start"]) and start_time(int(proc["pid"])) == proc["start"]


def _status(state: dict[str, Any]) -> str:
    if state["status"] != "stopped" and not alive(state["init"]):
        return "stopped"
    return str(state["status"])


def live_pids(state: dict[str, Any]) -> list[int]:
    return [int(p["pid"]) for p in [state["init"], *state["execs"]] if alive(p)]


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def wait_dead(state: dict[str, Any], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while live_pids(state) and time.monotonic() < deadline:
        time.sleep(0.005)


def write_pid_file(path: str, pid: int) -> None:
    if not path:
        return
    with open(path + ".tmp", "w") as f:
        f.write(str(pid))
    os.replace(path + ".tmp", path)


def new_container(call: Call, cid: str, bundle: str, init: dict[str, Any], status: str) -> dict[str, Any]:
    return {
        "id": cid,
        "bundle": bundle,
        "status": status,
        "init": init,
        "execs": [],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "resources": {},
        "systemd_cgroup": "--systemd-cgroup" in call.globals,
    }


def refuse_existing(root: str, cid: str) -> None:
    if os.path.exists(os.path.join(container_dir(root, cid), "state.json")):
        raise RuncError(f"container with id exists: {cid}")
