"""containerd's config (2.x and 1.7 layouts) and the CNI network of one test bed instance."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .images import PAUSE_IMAGE
from .layout import CNI_BIN_DIR, HOTRESTART_RUNTIME_TYPE, RUNC_RUNTIME_TYPE

if TYPE_CHECKING:
    from .containerd import ContainerdInstance


def cni_conflist(inst: ContainerdInstance) -> dict[str, Any]:
    """A bridge network on the instance's own bridge and subnet, IPAM data in its directory."""
    return {
        "cniVersion": "1.0.0",
        "name": inst.cni_network,
        "plugins": [
            {
                "type": "bridge",
                "bridge": inst.bridge,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": inst.subnet}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(inst.cni_data_dir),
                },
            }
        ],
    }


def containerd_config(inst: ContainerdInstance) -> dict[str, Any]:
    """The config.toml contents for the instance's containerd major version."""
    return _config_v2(inst) if inst.is_1_7 else _config_v3(inst)


def _runtimes(inst: ContainerdInstance) -> dict[str, Any]:
    runc: dict[str, Any] = {
        "runtime_type": RUNC_RUNTIME_TYPE,
        "options": {
            "Root": str(inst.state / "runc"),
            "SystemdCgroup": inst.systemd,
            **inst.runc_options,
        },
    }
    hot: dict[str, Any] = {
        "runtime_type": HOTRESTART_RUNTIME_TYPE,
        "pod_annotations": ["hotrestart.io/*"],
        "container_annotations": ["hotrestart.io/*"],
    }
    if inst.hotrestart_options:
        hot["options"] = dict(inst.hotrestart_options)
    if inst.is_1_7:
        runc["sandbox_mode"] = "podsandbox"
        hot["sandbox_mode"] = "podsandbox"
    return {"runc": runc, "hotrestart": hot} if inst.register_hotrestart else {"runc": runc}


def _common(inst: ContainerdInstance, version: int, disabled: list[str]) -> dict[str, Any]:
    return {
        "version": version,
        "root": str(inst.root),
        "state": str(inst.state),
        "temp": str(inst.dir / "tmp"),
        "disabled_plugins": disabled,
        "grpc": {"address": str(inst.address)},
        "ttrpc": {"address": str(inst.ttrpc_address)},
        "debug": {"level": inst.log_level},
    }


def _config_v3(inst: ContainerdInstance) -> dict[str, Any]:
    """containerd 2.x: CRI split into cri.v1.images / cri.v1.runtime / grpc.v1.cri."""
    cfg = _common(
        inst,
        3,
        [
            "io.containerd.nri.v1.nri",  # would share /var/run/nri/nri.sock
            "io.containerd.snapshotter.v1.btrfs",
            "io.containerd.snapshotter.v1.zfs",
            "io.containerd.snapshotter.v1.devmapper",
            "io.containerd.snapshotter.v1.blockfile",
            "io.containerd.snapshotter.v1.erofs",
            "io.containerd.differ.v1.erofs",
        ],
    )
    cfg["plugins"] = {
        "io.containerd.internal.v1.opt": {"path": str(inst.dir / "opt")},
        "io.containerd.grpc.v1.cri": {
            "disable_tcp_service": True,
            "stream_server_address": "127.0.0.1",
            "stream_server_port": "0",
            "enable_tls_streaming": False,
        },
        "io.containerd.cri.v1.images": {
            "snapshotter": "overlayfs",
            "pinned_images": {"sandbox": PAUSE_IMAGE},
        },
        "io.containerd.cri.v1.runtime": {
            "enable_selinux": False,
            "enable_cdi": False,
            "restrict_oom_score_adj": True,
            "netns_mounts_under_state_dir": True,
            "containerd": {
                "default_runtime_name": "runc",
                "runtimes": _runtimes(inst),
            },
            "cni": {
                "bin_dirs": [str(CNI_BIN_DIR)],
                "conf_dir": str(inst.cni_conf_dir),
                "max_conf_num": 1,
            },
        },
    }
    return cfg


def _config_v2(inst: ContainerdInstance) -> dict[str, Any]:
    """containerd 1.7: everything CRI lives in plugins."io.containerd.grpc.v1.cri"."""
    cfg = _common(
        inst,
        2,
        [
            "io.containerd.nri.v1.nri",
            "io.containerd.snapshotter.v1.btrfs",
            "io.containerd.snapshotter.v1.zfs",
            "io.containerd.snapshotter.v1.devmapper",
            "io.containerd.snapshotter.v1.aufs",
        ],
    )
    cfg["plugins"] = {
        "io.containerd.internal.v1.opt": {"path": str(inst.dir / "opt")},
        "io.containerd.grpc.v1.cri": {
            "sandbox_image": PAUSE_IMAGE,
            "enable_selinux": False,
            "enable_cdi": False,
            "restrict_oom_score_adj": True,
            "netns_mounts_under_state_dir": True,
            "disable_tcp_service": True,
            "stream_server_address": "127.0.0.1",
            "stream_server_port": "0",
            "enable_tls_streaming": False,
            "containerd": {
                "snapshotter": "overlayfs",
                "default_runtime_name": "runc",
                "runtimes": _runtimes(inst),
            },
            "cni": {
                "bin_dir": str(CNI_BIN_DIR),
                "conf_dir": str(inst.cni_conf_dir),
                "max_conf_num": 1,
            },
        },
    }
    return cfg
