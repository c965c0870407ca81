"""The host's containerd, asked through hostexec: its version, and its merged configuration.

The merged configuration (`containerd config dump`: the main file with its imports and
defaults) is what containerd will run with, so the installer compares it before and after
its change: our runtime must be there, and nothing else may differ.
"""

from __future__ import annotations

import tomllib
from typing import Any

from hotrestart.install import containerd_config as cc
from hotrestart.install import hostexec
from hotrestart.install.errors import InstallError


def major(host_root: str) -> int | None:
    """containerd's major version; None when there is no containerd on the host's PATH (one
    that lives elsewhere, as in k3s or RKE2, or a simulated host)."""
    result = hostexec.run(host_root, ["containerd", "--version"], timeout=30)
    if result.code == 127:
        return None
    if not result.ok:
        raise InstallError(
            f"the host's containerd cannot say its version (exit {result.code}: {result.output.strip()[-300:]})"
        )
    return cc.containerd_major(result.output)


def merged(host_root: str, config_path: str | None) -> dict[str, Any]:
    """containerd's merged configuration from `config_path`; its defaults when None (a main
    file that does not exist: containerd 1.7 refuses one named but missing)."""
    argv = ["containerd", "config", "default"]
    if config_path is not None:
        argv = ["containerd", "--config", config_path, "config", "dump"]
    result = hostexec.run(host_root, argv, timeout=60)
    if not result.ok:
        raise InstallError(f"containerd refuses the configuration (exit {result.code}): {result.output.strip()[-500:]}")
    try:
        return tomllib.loads(result.output)
    except tomllib.TOMLDecodeError as exc:
        raise InstallError(f"cannot read what `{' '.join(argv)}` says: {exc}") from None
