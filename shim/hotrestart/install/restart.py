"""Restarting the host's containerd so that it reads its changed configuration.

Pods keep running through a containerd restart (their shims are separate processes); only
new work waits for it. With HOTRESTART_RESTART=none nothing is restarted and the
administrator is told to do it.
"""

from __future__ import annotations

from collections.abc import Callable

from hotrestart.install import hostexec
from hotrestart.install.errors import InstallError
from hotrestart.install.settings import Settings


def systemctl_restart(unit: str) -> list[str]:
    """The command that restarts `unit` on the host (run through hostexec)."""
    return ["systemctl", "restart", unit]


def restart_containerd(settings: Settings, say: Callable[[str], None]) -> None:
    if settings.restart == "none":
        say(
            "containerd: NOT restarted (HOTRESTART_RESTART=none): restart containerd on this node "
            f"(systemctl restart {settings.containerd_unit}) for the change to take effect"
        )
        return
    argv = systemctl_restart(settings.containerd_unit)
    result = hostexec.run(settings.host_root, argv, timeout=300)
    if not result.ok:
        raise InstallError(f"{' '.join(argv)} failed (exit {result.code}): {result.output.strip()[-500:]}")
    say(f"containerd: restarted ({' '.join(argv)})")
