"""A node as users run one: the installer's DaemonSet on a kubeadm-style node, in the node VM.

The machine's own containerd runs as its systemd unit with `containerd config default` (and,
under the systemd cgroup driver, `SystemdCgroup = true`), as kubeadm's guide sets a node up
(testbed/node.py). The installer image runs through the CRI as the DaemonSet says, with the
machine's real `/` as its host mount: it copies the bundle, registers the runtime, and
restarts containerd through the machine's systemd. A `hotrestart` pod in the kubelet's cgroup
layout is then stopped and created again and continues, restored into the new pod's cgroup.
The uninstall puts the original configuration back byte for byte and restarts containerd again.

Runs only in the node VM (hack/vm.py sets HOTRESTART_E2E_NODE_VM=1), with the driver of
HOTRESTART_E2E_CGROUP_DRIVER; elsewhere it is skipped, since it rewrites the machine's own
containerd setup.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import daemonset
import pytest
from hotpods import Incarnation, run_and_stop, wait_published

from testbed import host
from testbed.layout import CGROUP_DRIVER_ENV
from testbed.node import CONFIG, KubeadmNode, in_node_vm, usable

# Skipped outside the node VM; inside it, a machine that cannot be set up fails the test.
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not in_node_vm(), reason=usable() or "-")]

REPO = Path(__file__).resolve().parents[2]
DROPIN = Path("/etc/containerd/conf.d/hotrestart.toml")
INSTALLED_SHIM = Path("/opt/hotrestart/current/bin/containerd-shim-hotrestart-v2")


V2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()


def _cgroup_of(pid: int) -> str:
    """The process's cgroup: the unified one, or the memory controller's on v1."""
    [path] = [path for controllers, path in host.cgroups_of(pid) if controllers == ("" if V2 else "memory")]
    return path


def _stop_bundle_processes() -> None:
    """The bundle's zygote outlives the pods, as on a drained node: SIGTERM ends it (and any
    shim still on its way out), so that the uninstall may remove the version."""
    for pid in host.mapping("/opt/hotrestart/"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    assert host.wait_until(lambda: not host.mapping("/opt/hotrestart/"), 30), host.mapping("/opt/hotrestart/")


def test_installer_on_a_kubeadm_node_hot_restarts_and_uninstalls(tmp_path: Path) -> None:
    archive = daemonset.installer_image()
    driver = os.environ.get(CGROUP_DRIVER_ENV) or "systemd"
    install, uninstall = daemonset.render("kustomize/base"), daemonset.render("kustomize/uninstall")
    with KubeadmNode(driver, tmp_path) as node, node.cri() as client:
        node.ctr("images", "import", "--local", str(archive))
        original = CONFIG.read_bytes()

        # Install: the bundle, the drop-in, one import line; containerd restarted by systemd.
        before = node.main_pid()
        log = daemonset.run_until_logged(client, node, tmp_path, install, Path("/"), "hotrestart: installed")
        node.wait_ready()
        assert node.main_pid() not in (0, before), (before, node.main_pid(), log)
        assert INSTALLED_SHIM.exists(), log
        dropin = DROPIN.read_text()
        systemd = driver == "systemd"
        assert f"SystemdCgroup = {'true' if systemd else 'false'}" in dropin, dropin
        assert f"SystemdCgroup: {'true' if systemd else 'false'}, as containerd's runc runtime has it" in log, log
        assert "doctor: [    ok ] runtime hotrestart: /opt/hotrestart/current/bin/" in log, log
        setup = f"cgroup {'v2' if V2 else 'v1'}, systemd as init, {driver} driver"
        assert f"doctor: [    ok ] cgroup setup (hotrestart): {setup}" in log, log

        # A pod of the runtime, in the kubelet's cgroup layout, stops to a checkpoint and the
        # next one continues from it, in its own pod's cgroup.
        counter, checksum = run_and_stop(client, node, tmp_path, "node-0")
        wait_published(node)
        again = Incarnation(client, node, tmp_path, "node-0")
        again.create()
        time.sleep(0.5)
        assert again.first()[:2] == (counter + 1, checksum)
        parent = node.pod_cgroup_parent(again.uid)
        cgroup = _cgroup_of(client.container_pid(again.cid))
        assert f"/{parent.lstrip('/')}/" in cgroup, (parent, cgroup)
        again.remove()
        _stop_bundle_processes()

        # Uninstall: the original configuration byte for byte, containerd restarted again.
        before = node.main_pid()
        ulog = daemonset.run_until_logged(client, node, tmp_path, uninstall, Path("/"), "hotrestart: uninstalled")
        node.wait_ready()
        assert CONFIG.read_bytes() == original, ulog
        assert not DROPIN.exists() and not Path("/opt/hotrestart").exists(), ulog
        assert node.main_pid() not in (0, before), ulog
