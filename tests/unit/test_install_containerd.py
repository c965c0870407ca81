"""What the installer writes, read by real containerd 1.7 and 2.x (`containerd config dump` and
`config default` only: nothing is started). Skipped where the test bed's binaries are not."""

from __future__ import annotations

import os
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from hotrestart import doctor, node_config
from hotrestart.install import config_edit
from hotrestart.install import containerd_config as cc

TESTBED = Path("/opt/hotrestart-testbed")
CONTAINERD_2 = TESTBED / "bin" / "containerd"
CONTAINERD_1_7 = TESTBED / "containerd-1.7" / "bin" / "containerd"
SHIM = "/opt/hotrestart/current/bin/containerd-shim-hotrestart-v2"
RUNTIME = cc.Runtime(
    name="hotrestart",
    install_dir="/opt/hotrestart",
    store="/var/lib/hotrestart/checkpoints",
    store_key="/etc/hotrestart/store-key",
    systemd_cgroup=True,
)
# An administrator's file: their sandbox image, their runc options.
ADMINS = {
    2: 'version = 2\n[plugins."io.containerd.grpc.v1.cri"]\n  sandbox_image = "example/pause:9.9"\n'
    '  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]\n    runtime_type = "io.containerd.runc.v2"\n'
    '  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]\n    SystemdCgroup = true\n',
    3: "version = 3\n[plugins.'io.containerd.cri.v1.images'.pinned_images]\n  sandbox = 'example/pause:9.9'\n"
    "[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]\n  SystemdCgroup = true\n",
}


def binary(path: Path) -> str:
    if not os.access(path, os.X_OK):
        pytest.skip(f"{path} is not installed (hack/install-testbed.sh)")
    return str(path)


def defaults(containerd: str) -> dict[str, Any]:
    out = subprocess.run([containerd, "config", "default"], capture_output=True, text=True, check=True, timeout=30)
    return tomllib.loads(out.stdout)


def with_dropin(tmp_path: Path, version: int, main: str | None) -> Path:
    dropin = tmp_path / "conf.d" / "hotrestart.toml"
    dropin.parent.mkdir(exist_ok=True)
    dropin.write_text(cc.render_dropin(version, RUNTIME))
    config = tmp_path / "config.toml"
    edited = config_edit.add_import(main, str(dropin), version=version, config_path=str(config))
    config.write_text(edited if edited is not None else main or "")
    return config


def merged(config: Path | str, containerd: str) -> dict[str, Any]:
    return node_config.dump(str(config), containerd)


@pytest.mark.parametrize(
    ("containerd", "version"),
    [(CONTAINERD_1_7, 2), (CONTAINERD_2, 2), (CONTAINERD_2, 3)],
    ids=["1.7", "2.x-v2", "2.x-v3"],
)
def test_containerd_reads_runtime_path_from_our_tables(tmp_path: Path, containerd: Path, version: int) -> None:
    view = merged(with_dropin(tmp_path, version, None), binary(containerd))
    found = node_config.registered(view)["hotrestart"]
    assert found.runtime_path == SHIM
    assert found.pod_annotations == ("hotrestart.io/*",)
    assert found.options.checkpoint_store == "/var/lib/hotrestart/checkpoints"
    assert found.options.store_key_file == "/etc/hotrestart/store-key"
    assert found.options.criu_path == "" and found.options.systemd_cgroup  # the bundle's shim runs its own CRIU
    checks = {c.name: c for c in doctor.runtime_checks(view)}
    assert checks["pod annotations (hotrestart)"].ok


@pytest.mark.parametrize("version", [2, 3])
def test_containerd_2_merges_the_dropin_and_keeps_the_admins_settings(tmp_path: Path, version: int) -> None:
    containerd = binary(CONTAINERD_2)
    (tmp_path / "before.toml").write_text(ADMINS[version])
    before = merged(tmp_path / "before.toml", containerd)
    after = merged(with_dropin(tmp_path, version, ADMINS[version]), containerd)
    assert cc.differences(before, after, "hotrestart") == []
    assert "hotrestart" in node_config.registered(after)
    assert cc.differences(defaults(containerd), merged(with_dropin(tmp_path, 3, None), containerd), "hotrestart") == []


def test_containerd_1_7_loses_its_cri_section_to_an_import(tmp_path: Path) -> None:
    """Why 1.7 gets a block in its main file: an imported file replaces the whole section."""
    containerd = binary(CONTAINERD_1_7)
    (tmp_path / "before.toml").write_text(ADMINS[2])
    before = merged(tmp_path / "before.toml", containerd)
    after = merged(with_dropin(tmp_path, 2, ADMINS[2]), containerd)
    lost = cc.differences(before, after, "hotrestart")
    assert "/plugins/io.containerd.grpc.v1.cri/sandbox_image" in lost
    assert "/plugins/io.containerd.grpc.v1.cri/containerd/runtimes/runc/runtime_type" in lost
    # Even with no CRI section of the admin's: the default runc goes, and with it the CRI plugin.
    assert set(cri_runtimes(merged(with_dropin(tmp_path, 2, None), containerd))) == {"hotrestart"}


def cri_runtimes(view: dict[str, Any]) -> dict[str, Any]:
    runtimes: dict[str, Any] = view["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]
    return runtimes


@pytest.mark.parametrize("admins", [True, False], ids=["admins-file", "no-file"])
def test_containerd_1_7_reads_the_block_and_keeps_everything_else(tmp_path: Path, admins: bool) -> None:
    containerd = binary(CONTAINERD_1_7)
    config = tmp_path / "config.toml"
    main = ADMINS[2].replace("  [plugins", "[plugins") if admins else None
    if main is not None:
        config.write_text(main)
    before = merged(config, containerd) if main is not None else defaults(containerd)
    parsed = tomllib.loads(main or "")
    kept = {} if admins else cc.default_runtimes(parsed, before, "hotrestart")
    assert set(kept) == (set() if admins else {"runc"})
    edited = config_edit.add_block(main, cc.render_block(RUNTIME, kept), version=2, config_path=str(config))
    assert edited is not None
    config.write_text(edited)
    after = merged(config, containerd)
    assert cc.differences(before, after, "hotrestart") == []
    assert node_config.registered(after)["hotrestart"].runtime_path == SHIM
    assert set(cri_runtimes(after)) == {"runc", "hotrestart"}
    if main is not None:
        back = config_edit.remove_block(edited, config_path=str(config))
        assert back == main
