"""The verbs that only report: ps, events, state, features, version."""

from __future__ import annotations

import contextlib
import json
import os

from .cli import Call
from .errors import RuncError
from .state import live_pids, load

VERSION = "1.2.5"
SPEC_VERSION = "1.2.0"


def do_ps(call: Call) -> int:
    state = load(call.root, call.cid())
    pids = live_pids(state)
    if call.flag("--format", "-f") == "json":
        print(json.dumps(pids))
    else:
        print("UID PID PPID C STIME TTY TIME CMD")
        for pid in pids:
            print(f"0 {pid} 0 0 00:00 ? 00:00:00 fake")
    return 0


def do_events(call: Call) -> int:
    cid = call.cid()
    state = load(call.root, cid)
    if not call.has("--stats"):
        raise RuncError("the fake runc reports events only with --stats")
    pids = live_pids(state)
    rss = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open(f"/proc/{pid}/statm") as f:
                rss += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    data = {
        "cpu": {"usage": {"total": 1000, "kernel": 400, "user": 600, "percpu": [1000]}},
        "memory": {"usage": {"usage": rss, "limit": 1 << 30}, "raw": {"rss": rss}},
        "pids": {"current": len(pids), "limit": 0},
    }
    print(json.dumps({"type": "stats", "id": cid, "data": data}))
    return 0


def do_state(call: Call) -> int:
    cid = call.cid()
    state = load(call.root, cid)
    alive = state["status"] != "stopped"
    print(
        json.dumps(
            {
                "ociVersion": SPEC_VERSION,
                "id": cid,
                "pid": int(state["init"]["pid"]) if alive else 0,
                "status": state["status"],
                "bundle": state["bundle"],
                "rootfs": os.path.join(state["bundle"], "rootfs"),
                "created": state["created"],
                "owner": "",
            },
            indent=2,
        )
    )
    return 0


def do_features(call: Call) -> int:
    features = {
        "ociVersionMin": "1.0.0",
        "ociVersionMax": SPEC_VERSION,
        "hooks": ["prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop"],
        "mountOptions": ["bind", "rbind", "ro", "rw", "nosuid", "nodev", "noexec"],
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "user", "uts"],
            "cgroup": {"v1": True, "v2": True, "systemd": True, "systemdUser": True},
            "seccomp": {"enabled": False},
            "apparmor": {"enabled": False},
            "selinux": {"enabled": False},
        },
        "annotations": {
            "org.opencontainers.runc.version": VERSION,
            "org.opencontainers.runc.checkpoint.enabled": "true",
        },
    }
    print(json.dumps(features, indent=2))
    return 0


def do_version(call: Call) -> int:
    print(f"runc version {VERSION}\ncommit: fake\nspec: {SPEC_VERSION}\ngo: go1.22.12\nlibseccomp: 2.5.5")
    return 0
