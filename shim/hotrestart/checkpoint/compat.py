"""Is a checkpoint a faithful past of the container being created now?

The spec digest covers what the process was started with: image, command and arguments,
environment, working directory and terminal, and its security context. The security context
is there because CRIU restores a process's credentials, capabilities, seccomp filters, LSM
labels and rlimits from the images, not from the live spec: restoring under a changed context
would quietly run the new pod with the old one (a pod that dropped a capability or moved to
another uid would get it back). Mounts, devices and resources are deliberately left out:
they come from the live spec at restore, never from the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
from collections.abc import Mapping
from typing import Any

from hotrestart.checkpoint.policy import IMAGE_NAME
from hotrestart.store.manifest import Manifest

CAPABILITY_SETS = ("bounding", "effective", "inheritable", "permitted", "ambient")
# Set by containerd from the pod's hostname: it differs between the replicas of one template,
# which restore each other's checkpoints. The restored process keeps the environment it had
# (it lives in its memory); its hostname is the new pod's.
_PER_POD_ENV = "HOSTNAME="


def image_of(spec: Mapping[str, Any]) -> str:
    return str((spec.get("annotations") or {}).get(IMAGE_NAME, ""))


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _sha256(value: Any) -> str:
    return hashlib.sha256(_canonical(value)).hexdigest()


def _process_fingerprint(spec: Mapping[str, Any]) -> dict[str, Any]:
    process = spec.get("process") or {}
    return {
        "image": image_of(spec),
        "args": process.get("args") or [],
        "env": sorted(e for e in process.get("env") or [] if not str(e).startswith(_PER_POD_ENV)),
        "cwd": process.get("cwd") or "/",
        "terminal": bool(process.get("terminal")),
    }


def security_context(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of the live spec that decide what the restored process may do, normalised.

    A privileged pod has no direct mark in the OCI spec; it shows as the full capability
    sets, empty masked and read-only paths and no seccomp profile, all covered here. Only
    namespace types are taken, not paths: every pod has its own, and whether the process
    shares the host's (hostNetwork, hostPID, hostIPC) or has a user namespace is what matters.
    User namespace id mappings are left out: the kubelet gives each pod its own range.
    """
    process = spec.get("process") or {}
    linux = spec.get("linux") or {}
    user = process.get("user") or {}
    caps = process.get("capabilities") or {}
    seccomp = linux.get("seccomp")
    return {
        "uid": int(user.get("uid") or 0),
        "gid": int(user.get("gid") or 0),
        "additional_gids": sorted({int(g) for g in user.get("additionalGids") or []}),
        "umask": user.get("umask"),
        "capabilities": {name: sorted(set(caps.get(name) or [])) for name in CAPABILITY_SETS},
        "no_new_privileges": bool(process.get("noNewPrivileges")),
        # Rule order is kept (it is part of the profile); only key order is canonicalised.
        "seccomp": _sha256(seccomp) if seccomp else "",
        "apparmor_profile": process.get("apparmorProfile") or "",
        "selinux_label": process.get("selinuxLabel") or "",
        "mount_label": linux.get("mountLabel") or "",
        "readonly_root": bool((spec.get("root") or {}).get("readonly")),
        # CRIU restores the dumped limits: a lowered RLIMIT_NPROC or NOFILE would not apply.
        "rlimits": sorted(
            [str(r.get("type", "")), int(r.get("hard") or 0), int(r.get("soft") or 0)]
            for r in process.get("rlimits") or []
        ),
        "masked_paths": sorted(linux.get("maskedPaths") or []),
        "readonly_paths": sorted(linux.get("readonlyPaths") or []),
        "namespaces": sorted({str(n.get("type", "")) for n in linux.get("namespaces") or []}),
    }


def security_digest(spec: Mapping[str, Any]) -> str:
    return _sha256(security_context(spec))


def spec_digest(spec: Mapping[str, Any]) -> str:
    """One digest over the process fingerprint and the security context: a change of either
    is an incompatibility, with no second field in the manifest."""
    return _sha256({"process": _process_fingerprint(spec), "security": security_digest(spec)})


def _legacy_digest(spec: Mapping[str, Any]) -> str:
    # What versions before the security context recorded (json.dumps' default separators);
    # used only to say why such a checkpoint is refused.
    return hashlib.sha256(json.dumps(_process_fingerprint(spec), sort_keys=True).encode()).hexdigest()


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def incompatibility(manifest: Manifest, spec: Mapping[str, Any], runtime: Mapping[str, str]) -> str:
    """Why `manifest` cannot be restored into `spec` on this node; "" when it can."""
    if manifest.image != image_of(spec):
        return f"image changed ({manifest.image} -> {image_of(spec)})"
    if manifest.spec_digest != spec_digest(spec):
        if manifest.spec_digest == _legacy_digest(spec):
            return "taken by an older version without a security digest"
        return "command, arguments, environment, working directory or security context changed"
    if manifest.runtime.get("arch") and manifest.runtime["arch"] != platform.machine():
        return f"architecture {manifest.runtime['arch']} cannot restore on {platform.machine()}"
    taken, here = manifest.runtime.get("criu", ""), runtime.get("criu", "")
    if taken and here and _version(here)[:1] < _version(taken)[:1]:
        return f"CRIU {here} is older than the {taken} that took the checkpoint"
    if not here:
        return "CRIU is not available on this node"
    return ""
