"""The machine's own containerd, set up the way a kubeadm node has it (for the node VM only).

A kubeadm node runs containerd as the systemd unit `containerd` (the unit containerd ships:
notify, Delegate=yes, KillMode=process), from /usr/local/bin, with the configuration that
`containerd config default` writes to /etc/containerd/config.toml and, under the systemd
cgroup driver (the kubeadm default), `SystemdCgroup = true` set for runc as kubeadm's guide
says. The kubelet puts each pod in its QoS class's cgroup: `kubepods-besteffort-pod<uid>.slice`
under systemd, `/kubepods/besteffort/pod<uid>` under cgroupfs. Pods get a CNI bridge from
/etc/cni/net.d. There is no network: the sandbox image the default configuration names is the
test bed's pause image, tagged so, as on an air-gapped node.

This writes to the machine's own /etc, /usr/local and systemd units, so it runs only where
`usable()` says: a throwaway machine booted by hack/vm.py, with systemd as init and no
containerd of its own. `teardown()` removes all of it again.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

from . import cleanup, host
from .errors import TestbedError
from .images import BUSYBOX_IMAGE, PAUSE_IMAGE, build_images
from .layout import BIN_DIR, NAMESPACE

# Set by hack/vm.py in its machine: the test bed may set this machine up as a node.
NODE_VM_ENV = "HOTRESTART_E2E_NODE_VM"
ADDRESS = Path("/run/containerd/containerd.sock")
CONFIG = Path("/etc/containerd/config.toml")
UNIT = "containerd"
UNIT_FILE = Path("/etc/systemd/system/containerd.service")
CNI_CONF = Path("/etc/cni/net.d/10-containerd-net.conflist")
BRIDGE = "cni0"
SUBNET = "10.244.0.0/24"
# The binaries as a release tarball installs them, linked to the test bed's.
BINARIES = {
    Path("/usr/local/bin/containerd"): BIN_DIR / "containerd",
    Path("/usr/local/bin/ctr"): BIN_DIR / "ctr",
    Path("/usr/local/bin/containerd-shim-runc-v2"): BIN_DIR / "containerd-shim-runc-v2",
    Path("/usr/local/sbin/runc"): BIN_DIR / "runc",
}
# What containerd and its pods leave on the node, and what the installer adds.
STATE = (Path("/var/lib/containerd"), Path("/run/containerd"))
OURS = (Path("/opt/hotrestart"), Path("/etc/hotrestart"))
STORE_ROOT = Path("/var/lib/hotrestart")  # the installer's default store; removed if it made it
CNI_STATE = (Path("/var/lib/cni/networks/containerd-net"),)
# The kubelet's pod cgroups under either driver.
KUBEPODS = ("/kubepods.slice", "/kubepods")

UNIT_TEXT = """\
[Unit]
Description=containerd container runtime
After=network.target local-fs.target dbus.service

[Service]
ExecStartPre=-/sbin/modprobe overlay
ExecStart=/usr/local/bin/containerd
Type=notify
Delegate=yes
KillMode=process
Restart=always
RestartSec=5
LimitNPROC=infinity
LimitCORE=infinity
TasksMax=infinity
OOMScoreAdjust=-999

[Install]
WantedBy=multi-user.target
"""


def in_node_vm() -> bool:
    return os.environ.get(NODE_VM_ENV) == "1"


def usable() -> str:
    """Why this machine may not be set up as a node ("" when it may)."""
    if not in_node_vm():
        return f"not the node VM ({NODE_VM_ENV} is not 1; `make test-vm-smoke` runs it)"
    if not Path("/run/systemd/system").is_dir():
        return "systemd is not init here"
    taken = [str(p) for p in (CONFIG.parent, UNIT_FILE, *BINARIES, *OURS) if p.exists() or p.is_symlink()]
    return f"this machine has a containerd of its own: {taken}" if taken else ""


def _run(*argv: str, timeout: float = 120) -> str:
    # Importing the installer image unpacks a few hundred MiB: minutes under emulation.
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout * host.TIME_SCALE, check=False)
    if done.returncode != 0:
        raise TestbedError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


class KubeadmNode:
    """containerd as the node's systemd unit; the CRI at /run/containerd/containerd.sock."""

    def __init__(self, cgroup_driver: str, work: Path) -> None:
        if cgroup_driver not in ("systemd", "cgroupfs"):
            raise TestbedError(f"unknown cgroup driver {cgroup_driver!r}")
        self.systemd = cgroup_driver == "systemd"
        self.work = work
        self.address = ADDRESS
        # The installer's default store (runtime-class/kustomize/base).
        self.store = Path("/var/lib/hotrestart/checkpoints")
        self._owned = False  # set once the machine passed usable(): only then is anything removed
        self._made_store_root = False

    def __enter__(self) -> KubeadmNode:
        why = usable()
        if why:
            raise TestbedError(why)
        self._owned = True
        self._made_store_root = not STORE_ROOT.exists()
        try:
            self.setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        problems = self.teardown()
        if problems and exc[0] is None:
            raise TestbedError(f"node teardown: {problems}")

    # -- setup ------------------------------------------------------------------------

    def setup(self) -> None:
        for link, target in BINARIES.items():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(target)
        CONFIG.parent.mkdir(parents=True)
        CONFIG.write_text(
            kubeadm_config(_run(str(BINARIES[Path("/usr/local/bin/containerd")]), "config", "default"), self.systemd)
        )
        CNI_CONF.parent.mkdir(parents=True, exist_ok=True)
        CNI_CONF.write_text(json.dumps(cni_conflist(), indent=2) + "\n")
        UNIT_FILE.write_text(UNIT_TEXT)
        _run("systemctl", "daemon-reload")
        _run("systemctl", "start", UNIT)
        self.wait_ready()
        images = build_images(self.work / "images.tar")
        self.ctr("images", "import", "--local", str(images))
        self.ctr("images", "tag", PAUSE_IMAGE, self.sandbox_image())
        with self.cri(timeout=5) as c:
            if not host.wait_until(lambda: all(c.image_status(i).id for i in (BUSYBOX_IMAGE, PAUSE_IMAGE)), 30):
                raise TestbedError("the CRI does not see the imported images")

    def sandbox_image(self) -> str:
        """The pause image the configuration names (the default one, registry.k8s.io/pause)."""
        cfg = tomllib.loads(CONFIG.read_text())
        return str(cfg["plugins"]["io.containerd.cri.v1.images"]["pinned_images"]["sandbox"])

    # -- use ----------------------------------------------------------------------------

    def cri(self, timeout: float = host.CRI_REQUEST_TIMEOUT) -> Any:
        from cri.client import CRIClient

        return CRIClient(self.address, timeout=timeout * host.TIME_SCALE)

    def ctr(self, *args: str) -> str:
        return _run(
            str(BINARIES[Path("/usr/local/bin/ctr")]), "--address", str(self.address), "--namespace", NAMESPACE, *args
        )

    def wait_ready(self, timeout: float = 120) -> None:
        """Until the CRI reports its runtime and network ready."""
        conds: dict[str, bool] = {}

        def ready() -> bool:
            nonlocal conds
            with contextlib.suppress(Exception), self.cri(timeout=5) as c:
                conds = {x.type: x.status for x in c.status().status.conditions}
            return bool(conds.get("RuntimeReady") and conds.get("NetworkReady"))

        if not host.wait_until(ready, timeout, interval=0.2):
            raise TestbedError(f"containerd's CRI not ready: {conds}; journal:\n{self.journal()}")

    def main_pid(self) -> int:
        """containerd's pid as systemd knows it (changes on every restart)."""
        return int(_run("systemctl", "show", "--value", "-p", "MainPID", UNIT).strip() or 0)

    def journal(self, lines: int = 60) -> str:
        with contextlib.suppress(Exception):
            return _run("journalctl", "-u", UNIT, "-n", str(lines), "--no-pager")
        return ""

    def pod_cgroup_parent(self, uid: str) -> str:
        """Where the kubelet puts a BestEffort pod."""
        uid = uid.replace("-", "_") if self.systemd else uid
        return f"kubepods-besteffort-pod{uid}.slice" if self.systemd else f"/kubepods/besteffort/pod{uid}"

    # -- teardown -----------------------------------------------------------------------

    def teardown(self) -> list[str]:
        """Pods, containerd and everything set up or left on the node go; the problems met."""
        if not self._owned:
            return ["not torn down: this machine was never set up as the node"]
        problems: list[str] = []
        if ADDRESS.exists():
            problems += cleanup.cri_teardown(ADDRESS, set())
        if UNIT_FILE.exists():
            problems += host.stop_systemd_unit(UNIT)
        # Shims (started with containerd's address), the bundle's zygote (it maps the install
        # folder), and whatever is left in the pods' cgroups.
        victims = {p.pid for p in host.processes() if p.arg_after("-address") == str(ADDRESS)}
        victims |= set(host.mapping("/opt/hotrestart/"))
        victims |= {
            p.pid for p in host.processes() if any(path.startswith(KUBEPODS) for _, path in host.cgroups_of(p.pid))
        }
        victims.discard(os.getpid())
        if left := host.kill_all(victims):
            problems.append(f"processes survived SIGKILL: {sorted(left)}")
        if self.systemd:
            problems += host.stop_systemd_unit("kubepods.slice")
        for path in STATE:
            if still := host.unmount_all(path):
                problems.append(f"still mounted: {still}")
        for ns in Path("/run/netns").glob("cni-*"):
            host.unmount_all(ns)
            with contextlib.suppress(OSError):
                ns.unlink()
        if busy := host.remove_cgroup_trees(KUBEPODS):
            problems.append(f"cgroups not removable: {busy[:5]}")
        host.delete_link(BRIDGE)
        for path in (UNIT_FILE, CNI_CONF, *BINARIES):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        for cached in Path("/var/lib/cni/results").glob("containerd-net-*"):
            cached.unlink(missing_ok=True)
        if UNIT_FILE.parent.is_dir():
            with contextlib.suppress(Exception):
                _run("systemctl", "daemon-reload")
        for path in (CONFIG.parent, *STATE, *OURS, *CNI_STATE, *([STORE_ROOT] if self._made_store_root else [])):
            shutil.rmtree(path, ignore_errors=True)
            if path.exists():
                problems.append(f"could not remove {path}")
        return problems


def kubeadm_config(default: str, systemd: bool) -> str:
    """`containerd config default`, edited as kubeadm's guide edits it for the systemd driver."""
    if not systemd:
        return default
    edited = default.replace("SystemdCgroup = false", "SystemdCgroup = true")
    if edited.count("SystemdCgroup = true") != 1:
        raise TestbedError("containerd's default config has no single `SystemdCgroup = false` to set")
    return edited


def cni_conflist() -> dict[str, Any]:
    """A bridge network as containerd's own CNI example gives one."""
    return {
        "cniVersion": "1.0.0",
        "name": "containerd-net",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": True,
                "promiscMode": True,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": SUBNET}]], "routes": [{"dst": "0.0.0.0/0"}]},
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }
