"""Is a checkpoint a faithful past of the container being created now?

The spec digest covers what the process was started with: image, command and arguments,
environment and working directory. Mounts, devices and resources are deliberately left out:
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


def image_of(spec: Mapping[str, Any]) -> str:
    return str((spec.get("annotations") or {}).get(IMAGE_NAME, ""))


def spec_digest(spec: Mapping[str, Any]) -> str:
    process = spec.get("process") or {}
    fingerprint = {
        "image": image_of(spec),
        "args": process.get("args") or [],
        "env": sorted(process.get("env") or []),
        "cwd": process.get("cwd") or "/",
        "terminal": bool(process.get("terminal")),
    }
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def incompatibility(manifest: Manifest, spec: Mapping[str, Any], runtime: Mapping[str, str]) -> str:
    """Why `manifest` cannot be restored into `spec` on this node; "" when it can."""
    if manifest.image != image_of(spec):
        return f"image changed ({manifest.image} -> {image_of(spec)})"
    if manifest.spec_digest != spec_digest(spec):
        return "command, arguments, environment or working directory changed"
    if manifest.runtime.get("arch") and manifest.runtime["arch"] != platform.machine():
        return f"architecture {manifest.runtime['arch']} cannot restore on {platform.machine()}"
    taken, here = manifest.runtime.get("criu", ""), runtime.get("criu", "")
    if taken and here and _version(here)[:1] < _version(taken)[:1]:
        return f"CRIU {here} is older than the {taken} that took the checkpoint"
    if not here:
        return "CRIU is not available on this node"
    return ""
