"""Dispatching one call: recorded, delayed or failed on request, then run under the root's lock."""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time

from . import lifecycle, reports
from .cli import Call
from .errors import RuncError

VERBS = {
    "create": lifecycle.do_create,
    "start": lifecycle.do_start,
    "restore": lifecycle.do_restore,
    "checkpoint": lifecycle.do_checkpoint,
    "kill": lifecycle.do_kill,
    "delete": lifecycle.do_delete,
    "pause": lifecycle.do_pause,
    "resume": lifecycle.do_resume,
    "update": lifecycle.do_update,
    "ps": reports.do_ps,
    "events": reports.do_events,
    "exec": lifecycle.do_exec,
    "state": reports.do_state,
    "features": reports.do_features,
    "version": reports.do_version,
}

# Verbs that read or write container state take the root's lock (delays are served first,
# so a slow verb can be cancelled without holding up the others).
_STATEFUL = {"create", "start", "restore", "checkpoint", "kill", "delete", "pause", "resume", "update", "exec"}


def _record(home: str, argv: list[str]) -> None:
    line = json.dumps({"argv": argv, "cwd": os.getcwd(), "pid": os.getpid()}) + "\n"
    fd = os.open(os.path.join(home, "calls.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _control(home: str, kind: str, verb: str) -> str | None:
    try:
        with open(os.path.join(home, kind, verb)) as f:
            return f.read()
    except FileNotFoundError:
        return None


def _log_error(log_path: str, msg: str) -> None:
    entry = json.dumps({"level": "error", "msg": msg, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    if log_path:
        with open(log_path, "a") as f:
            f.write(entry + "\n")
    else:
        print(msg, file=sys.stderr)


def main(argv: list[str], home: str) -> int:
    """Run one call of the fake installed in `home`; returns the exit code."""
    _record(home, argv)
    log_path = ""
    try:
        call = Call(argv)
        log_path = call.globals.get("--log", [""])[-1]
        delay = _control(home, "delay", call.verb)
        if delay is not None:
            time.sleep(float(delay or 0))
        failure = _control(home, "fail", call.verb)
        if failure is not None:
            spec = json.loads(failure)
            _log_error(log_path, str(spec.get("msg", f"{call.verb} failed on request")))
            return int(spec.get("code", 1))
        if call.verb not in _STATEFUL:
            return VERBS[call.verb](call)
        os.makedirs(call.root, mode=0o711, exist_ok=True)
        with open(os.path.join(call.root, ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return VERBS[call.verb](call)
    except RuncError as exc:
        _log_error(log_path, str(exc))
        return 1
