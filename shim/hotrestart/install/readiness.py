"""Whether the node is ready for hot-restart pods, and saying so with the node label.

The doctor that decides is the one just installed, run on the host (chrooted, with the
host's PATH), so it checks what containerd will really use: the host's containerd and its
merged configuration, the installed CRIU, the store. Only when it passes is the node
labelled; a failing doctor leaves the label off and says why.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from hotrestart.install import hostexec, node_label
from hotrestart.install.errors import InstallError
from hotrestart.install.settings import Settings

DOCTOR_TIMEOUT = 300.0


def doctor_argv(settings: Settings) -> list[str]:
    hotrestart = os.path.join(settings.install_dir, "current", "bin", "hotrestart")
    return [hotrestart, "doctor", "--containerd-config", settings.containerd_config]


def doctor(settings: Settings, say: Callable[[str], None]) -> bool:
    """Run the installed doctor on the host and print what it says; whether it passed."""
    result = hostexec.run(
        settings.host_root, doctor_argv(settings), timeout=DOCTOR_TIMEOUT, env={"HOTRESTART_STORE": settings.store}
    )
    for line in result.output.rstrip().splitlines():
        say(f"doctor: {line}")
    if not result.ok:
        say(f"doctor: FAILED (exit {result.code}): node label not set ({node_label.LABEL}=true waits for a pass)")
    return result.ok


def label(settings: Settings, ready: bool, say: Callable[[str], None]) -> None:
    """Set (ready) or remove the node label; raises InstallError when the API refuses."""
    api = node_label.in_cluster(settings)
    if api is None:
        say(f"no Kubernetes API in reach: node label not {'set' if ready else 'removed'}")
        return
    node_label.set_label(api, "true" if ready else None)
    say(f"node {api.node}: " + (f"labelled {node_label.LABEL}=true" if ready else f"label {node_label.LABEL} removed"))


def make_ready(settings: Settings, say: Callable[[str], None]) -> bool:
    """Doctor, then label: whether the node is labelled ready (or there is no API to label)."""
    if not doctor(settings, say):
        return False
    try:
        label(settings, True, say)
    except InstallError as exc:
        say(f"label: {exc}")
        return False
    return True
