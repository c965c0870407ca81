"""Small cgroup chores: thawing a container a failed dump left frozen."""

from __future__ import annotations

import contextlib
import os


def thaw(pid: int) -> None:
    """Thaw the freezer cgroup of `pid` (v1 freezer.state, v2 cgroup.freeze); best effort."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return
    for line in lines:
        _hid, controllers, path = line.split(":", 2)
        if "freezer" in controllers.split(","):
            with contextlib.suppress(OSError):
                with open(os.path.join("/sys/fs/cgroup/freezer", path.lstrip("/"), "freezer.state"), "w") as f:
                    f.write("THAWED")
        elif controllers == "":
            with contextlib.suppress(OSError):
                with open(os.path.join("/sys/fs/cgroup", path.lstrip("/"), "cgroup.freeze"), "w") as f:
                    f.write("0")
