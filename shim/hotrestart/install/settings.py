"""The installer's settings, from its environment (set by the DaemonSet's manifest).

The variable names are a contract with the Kubernetes manifests. Everything is checked here,
once, so that a bad value stops the installer before it touches the host. Host paths are
paths as the host sees them; the installer reaches them below `host_root`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping

from hotrestart.checkpoint.policy import parse_duration
from hotrestart.errors import InvalidArgumentError
from hotrestart.install.errors import InstallError
from hotrestart.sizes import parse_size
from hotrestart.store.s3 import Location

# Where the store key is copied on the host, and what the runtime's options name.
STORE_KEY_PATH = "/etc/hotrestart/store-key"
S3_CONFIG_PATH = "/etc/hotrestart/s3-config"

# The runtime's name is a TOML bare key in the drop-in and a RuntimeClass handler (a DNS label).
_RUNTIME_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
# A systemd unit name; never starting with "-", so systemctl cannot read it as an option.
_UNIT = re.compile(r"[A-Za-z0-9_.:@\\][A-Za-z0-9_.:@\\-]{0,255}")


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    host_root: str = "/host"
    install_dir: str = "/opt/hotrestart"
    containerd_config: str = "/etc/containerd/config.toml"
    containerd_dropin: str = "/etc/containerd/conf.d/hotrestart.toml"
    restart: str = "systemd"  # or "none"
    containerd_unit: str = "containerd"
    runtime_name: str = "hotrestart"
    store: str = "/var/lib/hotrestart/checkpoints"
    store_key_source: str = ""  # a file or key folder in the installer's container
    s3_config_source: str = ""  # an s3:// store's AWS config file in the installer's container
    retention_max_age: float | None = None
    retention_max_size: int | None = None
    prune_interval: float = 600.0
    systemd_cgroup: str = "auto"  # or "true" / "false"
    node_name: str = ""
    api_host: str = ""
    api_port: str = ""

    @property
    def store_key(self) -> str:
        """The host path of the copied store key; "" when the store has none."""
        return STORE_KEY_PATH if self.store_key_source else ""

    @property
    def s3_config(self) -> str:
        """The host path of the copied S3 config file; "" when there is none."""
        return S3_CONFIG_PATH if self.s3_config_source else ""

    @property
    def local_store(self) -> bool:
        """Whether the store is a folder on the node (else an s3:// URL)."""
        return not self.store.startswith("s3://")

    def on_host(self, host_path: str) -> str:
        """`host_path` as this process reaches it, below the host root."""
        return os.path.join(self.host_root, host_path.lstrip("/"))


_DEFAULTS = Settings()


def _host_path(name: str, value: str) -> str:
    # Host paths are walked name by name below the host root: no "..", nothing relative.
    if not value.startswith("/") or ".." in value.split("/") or "\0" in value:
        raise InstallError(f"{name}={value!r}: give an absolute path without '..'")
    return os.path.normpath(value)


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    value = value.strip().lower()
    if value not in allowed:
        raise InstallError(f"{name}={value!r}: use one of {', '.join(allowed)}")
    return value


def _duration(name: str, value: str) -> float:
    try:
        seconds = parse_duration(value)
    except InvalidArgumentError as exc:
        raise InstallError(f"{name}: {exc}") from None
    if seconds <= 0:
        raise InstallError(f"{name}={value!r}: must be more than zero")
    return seconds


def from_env(env: Mapping[str, str] = os.environ) -> Settings:
    """The settings from `env`; raises InstallError naming the first bad variable."""

    def get(name: str, default: str) -> str:
        return env.get(name, "").strip() or default

    config = _host_path(
        "HOTRESTART_CONTAINERD_CONFIG", get("HOTRESTART_CONTAINERD_CONFIG", _DEFAULTS.containerd_config)
    )
    default_dropin = os.path.join(os.path.dirname(config), "conf.d", "hotrestart.toml")
    runtime_name = get("HOTRESTART_RUNTIME_NAME", _DEFAULTS.runtime_name)
    if not _RUNTIME_NAME.fullmatch(runtime_name):
        raise InstallError(f"HOTRESTART_RUNTIME_NAME={runtime_name!r}: use a DNS label (a-z, 0-9, '-')")
    unit = get("HOTRESTART_CONTAINERD_UNIT", _DEFAULTS.containerd_unit)
    if not _UNIT.fullmatch(unit):
        raise InstallError(f"HOTRESTART_CONTAINERD_UNIT={unit!r}: not a systemd unit name")
    max_size = get("HOTRESTART_RETENTION_MAX_SIZE", "")
    try:
        retention_max_size = parse_size(max_size) if max_size else None
    except ValueError as exc:
        raise InstallError(f"HOTRESTART_RETENTION_MAX_SIZE: {exc}") from None
    max_age = get("HOTRESTART_RETENTION_MAX_AGE", "")
    key_source = get("HOTRESTART_STORE_KEY_SOURCE", "")
    if key_source and not os.path.isabs(key_source):
        raise InstallError(f"HOTRESTART_STORE_KEY_SOURCE={key_source!r}: give an absolute path")
    s3_source = get("HOTRESTART_S3_CONFIG_SOURCE", "")
    if s3_source and not os.path.isabs(s3_source):
        raise InstallError(f"HOTRESTART_S3_CONFIG_SOURCE={s3_source!r}: give an absolute path")
    store = get("HOTRESTART_STORE", _DEFAULTS.store)
    if store.startswith("s3://"):
        try:
            store = Location.parse(store).url
        except ValueError as exc:
            raise InstallError(f"HOTRESTART_STORE: {exc}") from None
        if not key_source:
            raise InstallError("HOTRESTART_STORE is an object store, which is shared: set HOTRESTART_STORE_KEY_SOURCE")
    else:
        store = _host_path("HOTRESTART_STORE", store)
    host_root = get("HOTRESTART_HOST_ROOT", _DEFAULTS.host_root)
    if not os.path.isabs(host_root):
        raise InstallError(f"HOTRESTART_HOST_ROOT={host_root!r}: give an absolute path")
    return Settings(
        host_root=os.path.normpath(host_root),
        install_dir=_host_path("HOTRESTART_INSTALL_DIR", get("HOTRESTART_INSTALL_DIR", _DEFAULTS.install_dir)),
        containerd_config=config,
        containerd_dropin=_host_path(
            "HOTRESTART_CONTAINERD_DROPIN", get("HOTRESTART_CONTAINERD_DROPIN", default_dropin)
        ),
        restart=_choice("HOTRESTART_RESTART", get("HOTRESTART_RESTART", _DEFAULTS.restart), ("systemd", "none")),
        containerd_unit=unit,
        runtime_name=runtime_name,
        store=store,
        store_key_source=key_source,
        s3_config_source=s3_source,
        retention_max_age=_duration("HOTRESTART_RETENTION_MAX_AGE", max_age) if max_age else None,
        retention_max_size=retention_max_size,
        prune_interval=_duration("HOTRESTART_PRUNE_INTERVAL", get("HOTRESTART_PRUNE_INTERVAL", "10m")),
        systemd_cgroup=_choice(
            "HOTRESTART_SYSTEMD_CGROUP", get("HOTRESTART_SYSTEMD_CGROUP", "auto"), ("auto", "true", "false")
        ),
        node_name=get("NODE_NAME", ""),
        api_host=get("KUBERNETES_SERVICE_HOST", ""),
        api_port=get("KUBERNETES_SERVICE_PORT", "443"),
    )
