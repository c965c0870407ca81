"""The node bundle this code runs from, if any: its root, what it carries, its own tools.

A bundle (`make dist`) is a relocatable tree with its own Python and CRIU, started through
`bin/` launchers. Its interpreter's prefix is the bundle's root, and the root holds
`share/hotrestart/bundle.json`, written when the bundle was built. Code that runs a tool the
bundle carries (criu, crit) asks here first, so a shim from the bundle never depends on the
host's PATH, which is containerd's and seldom names the bundle.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any

MARKER = os.path.join("share", "hotrestart", "bundle.json")
MAX_MARKER = 1 << 20


def root() -> str | None:
    """The bundle's root directory, or None when this code runs from an ordinary install."""
    candidate = sys.prefix
    return candidate if os.path.isfile(os.path.join(candidate, MARKER)) else None


def info() -> dict[str, Any]:
    """What the bundle says of itself (its version, and what it carries with theirs); empty
    outside a bundle or when the file cannot be read."""
    where = root()
    if where is None:
        return {}
    try:
        with open(os.path.join(where, MARKER), "rb") as f:
            data = json.loads(f.read(MAX_MARKER))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def own(name: str) -> str:
    """The bundle's own `name` (criu, crit, python3); "" outside a bundle."""
    where = root()
    if where is not None:
        path = os.path.join(where, "bin", name)
        if os.access(path, os.X_OK):
            return path
    return ""


def own_tools_first() -> None:
    """Put the bundle's bin/ first on this process's PATH (a shim from the bundle, at start).
    runc 1.2 and later run the CRIU on PATH whatever their --criu flag says (and print a
    warning into the container's log when given one), so PATH is how runc gets the bundle's
    CRIU. The shim's other children find the bundle's tools the same way."""
    where = root()
    if where is None:
        return
    own_bin = os.path.join(where, "bin")
    rest = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and d != own_bin]
    os.environ["PATH"] = os.pathsep.join([own_bin, *rest])


def tool(name: str) -> str:
    """The path of `name`: the bundle's own when running from one, otherwise the first on
    PATH; "" when there is none."""
    return own(name) or shutil.which(name) or ""


def describe() -> list[str]:
    """What the bundle carries, for `hotrestart version`; nothing outside a bundle."""
    carried = info()
    if not carried:
        return []
    debs = carried.get("debian_packages") or {}
    wheels = carried.get("python_packages") or {}
    lines = [
        f"bundle: {root()} (commit {carried.get('commit', 'unknown')})",
        f"  python {carried.get('python', '?')}, criu {carried.get('criu', '?')}, glibc {carried.get('glibc', '?')}",
    ]
    if isinstance(debs, dict):
        lines.append(f"  Debian {carried.get('debian_suite', '?')} packages: " + _listing(debs))
    if isinstance(wheels, dict):
        lines.append("  Python packages: " + _listing(wheels))
    return lines


def _listing(versions: dict[Any, Any]) -> str:
    return ", ".join(f"{name} {ver}" for name, ver in sorted(versions.items()))
