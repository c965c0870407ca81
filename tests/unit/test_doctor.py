"""`hotrestart doctor`: the bundle, our runtimes as containerd has them, and their stores."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest

from hotrestart import bundle, cli, doctor
from hotrestart.node_config import SHIM_TYPE

CONTAINERD_1_7 = Path("/opt/hotrestart-testbed/containerd-1.7/bin/containerd")


def config(**runtimes: dict[str, Any]) -> dict[str, Any]:
    return {"version": 3, "plugins": {"io.containerd.cri.v1.runtime": {"containerd": {"runtimes": runtimes}}}}


def ours(**fields: Any) -> dict[str, Any]:
    return {"runtime_type": SHIM_TYPE, "pod_annotations": ["hotrestart.io/*"], **fields}


def test_the_bundle_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bundle, "root", lambda: None)
    assert doctor.bundle_check().detail == "installed with pip"
    monkeypatch.setattr(bundle, "root", lambda: "/opt/hotrestart/versions/0.1.0-abc")
    monkeypatch.setattr(bundle, "info", lambda: {"version": "0.1.0"})
    check = doctor.bundle_check()
    assert check.ok and check.detail == "/opt/hotrestart/versions/0.1.0-abc (0.1.0)"


def test_criu_is_the_bundles_own(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    criu = tmp_path / "criu"
    criu.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo 'Version: 4.1' || echo 'Looks good.'\n")
    criu.chmod(0o755)
    monkeypatch.setattr(bundle, "tool", lambda name: str(criu) if name == "criu" else "")
    checks = {c.name: c for c in doctor.criu_checks()}
    assert checks["criu version"].ok and checks["criu version"].detail == f"4.1 ({criu})"
    assert checks["criu check"].ok and checks["criu check"].detail == "Looks good."
    monkeypatch.setattr(bundle, "tool", lambda name: "")
    (missing,) = doctor.criu_checks()
    assert not missing.ok and missing.detail == "not found (bundle or PATH)"


def test_pod_annotations_must_reach_the_shim() -> None:
    assert doctor.annotations_passed(("hotrestart.io/*",))
    assert doctor.annotations_passed(("example.com/*", "hotrestart.io/*"))
    assert not doctor.annotations_passed(("*",)), "containerd's * stops at '/'"
    assert not doctor.annotations_passed(("hotrestart.io/checkpoint",)), "one of many"
    assert not doctor.annotations_passed(())


def test_no_runtime_registered_says_how_to_fix_it() -> None:
    (check,) = doctor.runtime_checks(config(runc={"runtime_type": "io.containerd.runc.v2"}))
    assert not check.ok and "no runtime of type io.containerd.hotrestart.v2" in check.detail
    assert "hotrestart install" in check.fix


def test_our_runtimes_are_checked_one_by_one(tmp_path: Path) -> None:
    shim = tmp_path / "containerd-shim-hotrestart-v2"
    shim.write_text("#!/bin/sh\n")
    shim.chmod(0o755)
    checks = {
        c.name: c
        for c in doctor.runtime_checks(
            config(
                runc={"runtime_type": "io.containerd.runc.v2", "options": {"SystemdCgroup": True}},
                good=ours(runtime_path=str(shim), options={"SystemdCgroup": True}),
                gone=ours(runtime_path=str(tmp_path / "nothing"), pod_annotations=["*"], options={}),
            )
        )
    }
    assert checks["runtime good"].ok and checks["runtime good"].detail == str(shim)
    assert checks["pod annotations (good)"].ok
    assert (
        checks["cgroup driver (good)"].ok and checks["cgroup driver (good)"].detail == "systemd (runc runtime: systemd)"
    )
    assert not checks["runtime gone"].ok and "missing or not executable" in checks["runtime gone"].detail
    annotations = checks["pod annotations (gone)"]
    assert not annotations.ok and annotations.fix.startswith('set pod_annotations = ["hotrestart.io/*"]')
    driver = checks["cgroup driver (gone)"]
    assert not driver.ok and driver.fix == "set SystemdCgroup = true in the options of gone, as for runc"


def test_a_node_local_store(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n")
    store = tmp_path / "store"
    store.mkdir()
    checks = {c.name: c for c in doctor.store_checks(str(store), mountinfo=str(mountinfo))}
    assert checks[f"store {store}"].ok and checks[f"store {store}"].detail == "exists, writable"
    assert checks["store key"].ok and checks["store key"].detail == "none: the store is node-local (ext4)"
    assert checks["store space"].ok and checks["store space"].detail.endswith("GiB free")
    later = doctor.store_checks(str(tmp_path / "a" / "b"), mountinfo=str(mountinfo))[0]
    assert later.ok and later.detail == f"will be created (in {tmp_path}), writable"
    (tmp_path / "file").write_text("")
    blocked = doctor.store_checks(str(tmp_path / "file" / "store"), mountinfo=str(mountinfo))[0]
    assert not blocked.ok and "is not a folder" in blocked.detail


def test_a_shared_store_needs_a_key(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        f"22 1 8:1 / / rw - ext4 /dev/sda1 rw\n40 22 0:50 / {tmp_path}/nfs rw - nfs4 server:/export rw\n"
    )
    store = tmp_path / "nfs"
    store.mkdir()
    key = {c.name: c for c in doctor.store_checks(str(store), mountinfo=str(mountinfo))}["store key"]
    assert not key.ok and "on nfs4, which other machines can write" in key.detail
    assert key.fix == "set StoreKeyFile (hotrestart install: HOTRESTART_STORE_KEY_SOURCE)"
    lax = {c.name: c for c in doctor.store_checks(str(store), "", True, mountinfo=str(mountinfo))}["store key"]
    assert lax.ok and "unauthenticated checkpoints are allowed" in lax.detail
    key_file = tmp_path / "store-key"
    key_file.write_text("k1:" + "A" * 43 + "=\n")
    key_file.chmod(0o600)
    if os.geteuid() == 0:  # the doctor wants the key root's, as the shim does
        keyed = {c.name: c for c in doctor.store_checks(str(store), str(key_file), mountinfo=str(mountinfo))}
        assert keyed["store key"].ok and keyed["store key"].detail == f"{key_file} (1 key(s), k1 seals)"
    key_file.chmod(0o644)
    bad = {c.name: c for c in doctor.store_checks(str(store), str(key_file), mountinfo=str(mountinfo))}["store key"]
    assert not bad.ok and bad.fix == "fix the key file (see SECURITY.md)"


def test_too_little_space_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("22 1 8:1 / / rw - ext4 /dev/sda1 rw\n")
    monkeypatch.setattr(doctor, "MIN_FREE_GIB", 1e12)
    space = {c.name: c for c in doctor.store_checks(str(tmp_path), mountinfo=str(mountinfo))}["store space"]
    assert not space.ok and space.fix.startswith("free at least")


def test_each_runtimes_store_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HOTRESTART_STORE", raising=False)
    monkeypatch.delenv("HOTRESTART_STORE_KEY", raising=False)
    monkeypatch.delenv("HOTRESTART_ALLOW_UNAUTHENTICATED", raising=False)
    found = doctor.stores(
        config(
            a=ours(options={"CheckpointStore": "/srv/a", "StoreKeyFile": "/etc/k"}),
            b=ours(options={"CheckpointStore": "/srv/a"}),
            c=ours(options={"AllowUnauthenticatedCheckpoints": True}),
        )
    )
    assert found == [("/srv/a", "/etc/k", False), ("/var/lib/hotrestart", "", True)]
    monkeypatch.setenv("HOTRESTART_STORE", "/srv/env")
    assert doctor.stores(None) == [("/srv/env", "", False)]


def test_doctor_reads_containerd_given_on_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    if not os.access(CONTAINERD_1_7, os.X_OK):
        pytest.skip(f"{CONTAINERD_1_7} is not installed")
    shim = tmp_path / "shim"
    shim.write_text("#!/bin/sh\n")
    shim.chmod(stat.S_IRWXU)
    main = tmp_path / "config.toml"
    main.write_text(
        "version = 2\n"
        '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]\n  runtime_type = "io.containerd.runc.v2"\n'
        '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.hot]\n'
        f'  runtime_type = "{SHIM_TYPE}"\n  runtime_path = "{shim}"\n  pod_annotations = ["*"]\n'
        f'  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.hot.options]\n'
        f'    CheckpointStore = "{tmp_path / "store"}"\n'
    )
    # What needs the node itself (CRIU, GPUs) is other tests' business.
    monkeypatch.setattr(doctor, "criu_checks", lambda: [])
    monkeypatch.setattr(doctor, "gpu_checks", lambda: [])
    with pytest.raises(SystemExit) as done:
        cli.main(["doctor", "--containerd", str(CONTAINERD_1_7), "--containerd-config", str(main)])
    out = capsys.readouterr().out
    assert done.value.code == 1
    assert "[    ok ] containerd: 1.7" in out
    assert f"[    ok ] runtime hot: {shim}" in out
    assert "[MISSING] pod annotations (hot): pod_annotations = ['*']" in out
    assert f"store {tmp_path / 'store'}: will be created" in out
    assert "[    ok ] archive restore (hot): off (the default)" in out


def test_work_folders_in_memory_are_reported() -> None:
    ok = doctor.work_check({"HOTRESTART_WORK_DIR": "/var/lib/hotrestart/work", "HOTRESTART_WORK_MEMORY": "1G"})
    assert "up to 1024 MiB each" in ok.detail
    bad = doctor.work_check({"HOTRESTART_WORK_DIR": "/dev/shm/hotrestart-work"})
    assert not bad.ok and "HOTRESTART_WORK_DIR" in bad.fix


def test_the_cgroup_setup_is_judged_with_the_node(tmp_path: Path) -> None:
    v1, v2, systemd, bare = tmp_path / "v1", tmp_path / "v2", tmp_path / "systemd", tmp_path / "none"
    for d in (v1, v2, systemd):
        d.mkdir()
    (v2 / "cgroup.controllers").write_text("cpu memory\n")

    def judge(driver: bool, root: Path, init: Path) -> doctor.Check:
        return doctor.driver_support("hot", driver, str(root), str(init))

    refused = judge(True, v2, bare)
    assert not refused.ok and refused.fix.startswith("the systemd driver needs systemd as init")
    assert judge(True, v2, systemd).detail == "cgroup v2, systemd as init, systemd driver: tested (node VM)"
    assert judge(True, v1, systemd).detail.endswith("not tested on v1")
    assert "kubeadm's default here is the systemd driver" in judge(False, v2, systemd).detail
    assert judge(False, v1, bare).detail == "cgroup v1, no systemd as init, cgroupfs driver: tested"
    assert all(judge(d, r, i).ok for d, r, i in ((True, v2, systemd), (False, v2, systemd), (False, v1, bare)))
