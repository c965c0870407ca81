"""The compatibility digest: process fingerprint and security context."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from typing import Any

import pytest

from hotrestart.checkpoint.compat import incompatibility, security_digest, spec_digest
from hotrestart.store.manifest import Identity, Manifest

CAPS = ["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_SETUID"]


def live_spec() -> dict[str, Any]:
    """The fields containerd's CRI writes for an ordinary (unprivileged) container."""
    return {
        "annotations": {"io.kubernetes.cri.image-name": "example/app:1"},
        "root": {"path": "rootfs", "readonly": False},
        "process": {
            "args": ["app", "--serve"],
            "env": ["A=1", "B=2"],
            "cwd": "/",
            "terminal": False,
            "user": {"uid": 0, "gid": 0, "additionalGids": [0, 10], "umask": 18},
            "capabilities": {name: list(CAPS) for name in ("bounding", "effective", "permitted")},
            "noNewPrivileges": False,
            "apparmorProfile": "cri-containerd.apparmor.d",
            "selinuxLabel": "system_u:system_r:container_t:s0:c1,c2",
            "rlimits": [
                {"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024},
                {"type": "RLIMIT_NPROC", "hard": 512, "soft": 512},
            ],
        },
        "linux": {
            "seccomp": {
                "defaultAction": "SCMP_ACT_ERRNO",
                "architectures": ["SCMP_ARCH_X86_64"],
                "syscalls": [{"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"}],
            },
            "mountLabel": "system_u:object_r:container_file_t:s0:c1,c2",
            "maskedPaths": ["/proc/kcore", "/proc/keys"],
            "readonlyPaths": ["/proc/bus", "/proc/sys"],
            "namespaces": [{"type": "pid"}, {"type": "network", "path": "/proc/1/ns/net"}, {"type": "mount"}],
            "resources": {"memory": {"limit": 1 << 30}},
        },
        "mounts": [{"destination": "/data", "source": "/var/lib/kubelet/x", "type": "bind"}],
    }


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(spec: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = spec
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value

    return change


def _drop_cap(name: str) -> Callable[[dict[str, Any]], None]:
    def change(spec: dict[str, Any]) -> None:
        spec["process"]["capabilities"][name] = CAPS[:-1]

    return change


def _seccomp_rule(spec: dict[str, Any]) -> None:
    spec["linux"]["seccomp"]["syscalls"][0]["names"].append("ptrace")


SECURITY_CHANGES: dict[str, Callable[[dict[str, Any]], None]] = {
    "uid": _set("process.user.uid", 1000),
    "gid": _set("process.user.gid", 1000),
    "additional gids": _set("process.user.additionalGids", [0, 10, 27]),
    "umask": _set("process.user.umask", 0),
    "bounding": _drop_cap("bounding"),
    "effective": _drop_cap("effective"),
    "permitted": _drop_cap("permitted"),
    "inheritable": _set("process.capabilities.inheritable", ["CAP_KILL"]),
    "ambient": _set("process.capabilities.ambient", ["CAP_KILL"]),
    "no new privileges": _set("process.noNewPrivileges", True),
    "seccomp rule": _seccomp_rule,
    "seccomp default": _set("linux.seccomp.defaultAction", "SCMP_ACT_ALLOW"),
    "seccomp removed": _set("linux.seccomp", None),
    "apparmor": _set("process.apparmorProfile", "unconfined"),
    "selinux label": _set("process.selinuxLabel", "system_u:system_r:spc_t:s0"),
    "mount label": _set("linux.mountLabel", "system_u:object_r:container_file_t:s0:c3,c4"),
    "readonly root": _set("root.readonly", True),
    "rlimits": _set("process.rlimits", [{"type": "RLIMIT_NOFILE", "hard": 1 << 20, "soft": 1 << 20}]),
    "masked paths": _set("linux.maskedPaths", []),
    "readonly paths": _set("linux.readonlyPaths", []),
    "host network": _set("linux.namespaces", [{"type": "pid"}, {"type": "mount"}]),
}


@pytest.mark.parametrize("change", SECURITY_CHANGES.values(), ids=SECURITY_CHANGES.keys())
def test_every_security_field_changes_the_digests(change: Callable[[dict[str, Any]], None]) -> None:
    before = live_spec()
    after = copy.deepcopy(before)
    change(after)
    assert security_digest(after) != security_digest(before)
    assert spec_digest(after) != spec_digest(before)


PROCESS_CHANGES: dict[str, Callable[[dict[str, Any]], None]] = {
    "args": _set("process.args", ["app", "--other"]),
    "env": _set("process.env", ["A=1", "B=3"]),
    "cwd": _set("process.cwd", "/srv"),
    "terminal": _set("process.terminal", True),
    "image": _set("annotations", {"io.kubernetes.cri.image-name": "example/app:2"}),
}


@pytest.mark.parametrize("change", PROCESS_CHANGES.values(), ids=PROCESS_CHANGES.keys())
def test_process_fields_change_the_spec_digest_only(change: Callable[[dict[str, Any]], None]) -> None:
    before = live_spec()
    after = copy.deepcopy(before)
    change(after)
    assert spec_digest(after) != spec_digest(before)
    assert security_digest(after) == security_digest(before)


def test_order_does_not_matter() -> None:
    before = live_spec()
    after = copy.deepcopy(before)
    after["process"]["env"].reverse()
    for name in ("bounding", "effective", "permitted"):
        after["process"]["capabilities"][name].reverse()
    after["process"]["user"]["additionalGids"].reverse()
    after["process"]["rlimits"].reverse()
    after["linux"]["maskedPaths"].reverse()
    after["linux"]["readonlyPaths"].reverse()
    after["linux"]["namespaces"].reverse()
    after["linux"]["seccomp"] = dict(reversed(list(after["linux"]["seccomp"].items())))
    assert spec_digest(after) == spec_digest(before)


def test_what_comes_from_the_live_spec_is_left_out() -> None:
    before = live_spec()
    after = copy.deepcopy(before)
    after["mounts"] = []
    after["linux"]["resources"] = {"memory": {"limit": 1}}
    after["linux"]["namespaces"][1]["path"] = "/proc/2/ns/net"  # every pod has its own
    after["root"]["path"] = "/run/elsewhere/rootfs"
    assert spec_digest(after) == spec_digest(before)


def manifest_for(digest: str) -> Manifest:
    return Manifest(
        id="x",
        identity=Identity("ns", "web-0", "app"),
        created_at=0,
        node="n",
        reason="stop",
        image="example/app:1",
        spec_digest=digest,
        runtime={"criu": "4.2"},
        network={},
        files=[],
        timings={},
    )


def test_reasons() -> None:
    spec = live_spec()
    here = {"criu": "4.2"}
    assert incompatibility(manifest_for(spec_digest(spec)), spec, here) == ""
    dropped = copy.deepcopy(spec)
    _drop_cap("bounding")(dropped)
    reason = incompatibility(manifest_for(spec_digest(spec)), dropped, here)
    assert reason == "command, arguments, environment, working directory or security context changed"
    # A manifest written before the security context was part of the digest: a cold start.
    old = {"image": "example/app:1", "args": ["app", "--serve"], "env": ["A=1", "B=2"], "cwd": "/", "terminal": False}
    legacy = hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()
    assert incompatibility(manifest_for(legacy), spec, here) == "taken by an older version without a security digest"
