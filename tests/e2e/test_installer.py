"""The cluster install, simulated on one node: the installer image run as its DaemonSet says.

The DaemonSet is rendered from runtime-class/ with kustomize (the base, then the uninstall
overlay), and its container runs under the real containerd through the CRI as a kubelet would
run it: the same command, environment, privileges and host mount, except that the host's `/`
is a scratch directory. That scratch host has its own containerd config (this containerd's,
with runc only) and a `systemctl` stand-in that records what it is asked.

Then a containerd started with the installed config, in a mount namespace where the scratch
host's /etc/containerd, /opt/hotrestart and /var/lib/hotrestart stand at their real places,
runs a `hotrestart` pod that is stopped and created again and continues. Uninstall puts the
original config back byte for byte and removes everything the install added.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import daemonset
import pytest
from hotpods import Incarnation, run_and_stop, wait_published

from testbed import BIN_DIR, TESTBED, ContainerdInstance, host

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SYSTEMCTL_LOG = "var/log/systemctl-calls"
# What the install puts on a host, besides the import line in containerd's main config.
ADDED = ("etc/containerd/conf.d/hotrestart.toml", "opt/hotrestart", "var/lib/hotrestart")
# What the scratch host takes from the real one (see _mounted_as_host).
MOUNTED = ("proc", "sys", "dev", TESTBED.relative_to("/").as_posix())
# The host paths a containerd started with the installed config must find in place.
HOST_DIRS = ("etc/containerd", "opt/hotrestart", "var/lib/hotrestart")


def _scratch_host(where: Path, main_config: bytes) -> Path:
    """A host root with containerd (the binary, the C library it links and its config), a
    shell and a recording `systemctl`."""
    (where / "etc" / "containerd").mkdir(parents=True)
    (where / "etc" / "containerd" / "config.toml").write_bytes(main_config)
    for d in ("bin", "usr/bin", "usr/local/bin", "var/log", "tmp", "lib64", "lib/x86_64-linux-gnu", *MOUNTED):
        (where / d).mkdir(parents=True, exist_ok=True)
    (where / "usr" / "local" / "bin" / "runc").symlink_to(BIN_DIR / "runc")
    shutil.copy2("/bin/busybox", where / "bin" / "sh")
    shutil.copy2(os.path.realpath(BIN_DIR / "containerd"), where / "usr" / "bin" / "containerd")
    for lib in ("lib64/ld-linux-x86-64.so.2", "lib/x86_64-linux-gnu/libc.so.6"):
        shutil.copy2(os.path.realpath(Path("/") / lib), where / lib)
    systemctl = where / "usr" / "bin" / "systemctl"
    systemctl.write_text(f'#!/bin/sh\necho "$*" >> /{SYSTEMCTL_LOG}\n')
    systemctl.chmod(0o755)
    return where


def _calls(host_root: Path) -> list[str]:
    path = host_root / SYSTEMCTL_LOG
    return path.read_text().splitlines() if path.exists() else []


def _snapshot(root: Path) -> dict[str, bytes | str]:
    """Every file (its bytes) and link (its target) of the scratch host, but what is mounted
    from the real one."""
    found: dict[str, bytes | str] = {}
    for top, dirs, files in os.walk(root):
        rel_top = Path(top).relative_to(root)
        dirs[:] = sorted(d for d in dirs if str(rel_top / d) not in MOUNTED)
        for name in sorted(files) + [d for d in dirs if (Path(top) / d).is_symlink()]:
            path = Path(top) / name
            rel = str(rel_top / name)
            found[rel] = "-> " + os.readlink(path) if path.is_symlink() else path.read_bytes()
    return found


@contextlib.contextmanager
def _mounted_as_host(host_root: Path) -> Iterator[None]:
    """The scratch host root as a node's / is: a shared mount (HostToContainer needs one),
    with the host's /proc (so that the installer sees which bundle versions run), /sys, /dev
    and the test bed's runc and CRIU (for the doctor's checks).

    On a host whose / is shared (systemd makes it so), a copy of a shared mount joins its
    peer group, and unmounting the copy would unmount the original: the scratch root gets a
    peer group of its own, and the copies of the host's mounts are made its slaves."""
    subprocess.run(["mount", "--bind", str(host_root), str(host_root)], check=True)
    try:
        subprocess.run(["mount", "--make-private", str(host_root)], check=True)
        subprocess.run(["mount", "--make-rshared", str(host_root)], check=True)
        subprocess.run(["mount", "-t", "proc", "proc", str(host_root / "proc")], check=True)
        for rel in MOUNTED[1:]:
            subprocess.run(["mount", "--rbind", f"/{rel}", str(host_root / rel)], check=True)
            subprocess.run(["mount", "--make-rslave", str(host_root / rel)], check=True)
        yield
    finally:
        subprocess.run(["umount", "-R", "-l", str(host_root)], check=False)


@contextlib.contextmanager
def _host_dirs() -> Iterator[None]:
    """Mount points for the scratch host's directories; those made here are removed after."""
    made = []
    for rel in HOST_DIRS:
        path = Path("/") / rel
        if not path.exists():
            path.mkdir(parents=True)
            made.append(path)
    try:
        yield
    finally:
        for path in reversed(made):
            with contextlib.suppress(OSError):
                path.rmdir()


def _kill_processes_naming(text: str) -> None:
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    os.kill(int(entry.name), signal.SIGKILL)
        except OSError:
            continue


def test_cluster_install_runs_hot_restart_and_uninstalls_cleanly(
    containerd_factory: Callable[..., ContainerdInstance], tmp_path: Path
) -> None:
    archive = daemonset.installer_image()
    install, uninstall = daemonset.render("kustomize/base"), daemonset.render("kustomize/uninstall")
    inst = containerd_factory("2", register_hotrestart=False)
    inst.ctr("images", "import", "--local", str(archive))
    original = inst.config_path.read_bytes()
    host_root = _scratch_host(tmp_path / "host", original)
    before = _snapshot(host_root)
    client = inst.cri()
    try:
        with _mounted_as_host(host_root), _host_dirs():
            # Install: the drop-in lands, one import is added, containerd is restarted once.
            log = daemonset.run_until_logged(client, inst, tmp_path, install, host_root, "hotrestart: installed")
            main = (host_root / "etc/containerd/config.toml").read_bytes()
            assert main != original and main.startswith(original.split(b"\n")[0]), main[:200]
            dropin = (host_root / "etc/containerd/conf.d/hotrestart.toml").read_text()
            assert "io.containerd.hotrestart.v2" in dropin and "/opt/hotrestart/current/bin/" in dropin, dropin
            assert (host_root / "opt/hotrestart/current/bin/containerd-shim-hotrestart-v2").exists()
            assert _calls(host_root) == ["restart containerd"], _calls(host_root)
            # The doctor ran from the installed bundle, and no node is labelled without a Kubernetes
            # API (and here CRIU cannot check the kernel from inside the scratch root).
            assert "doctor: [    ok ] runtime hotrestart: /opt/hotrestart/current/bin/" in log, log
            assert "not labelled" in log or "node label not set" in log, log

            # A second run changes nothing and restarts nothing.
            installed = _snapshot(host_root)
            daemonset.run_until_logged(client, inst, tmp_path, install, host_root, "hotrestart: installed")
            assert _snapshot(host_root) == installed
            assert _calls(host_root) == ["restart containerd"]

            # containerd with the installed config runs a hotrestart pod that hot-restarts.
            binds = " ".join(f'mount --bind "{host_root / rel}" "/{rel}";' for rel in HOST_DIRS)
            inst.config_path.write_bytes(main)
            inst.command_prefix = ["/usr/bin/unshare", "--mount", "--propagation", "private", "--"]
            inst.command_prefix += ["/bin/sh", "-c", f'set -e; {binds} exec "$@"', "binds"]
            inst.store = host_root / "var/lib/hotrestart/checkpoints"
            inst.restart()
            counter, checksum = run_and_stop(client, inst, tmp_path, "installed-0")
            wait_published(inst)
            again = Incarnation(client, inst, tmp_path, "installed-0")
            again.create()
            time.sleep(0.5)
            assert again.first()[:2] == (counter + 1, checksum)
            again.remove()

            # Back to the node's own config; the bundle's zygote goes, as on a drained node.
            inst.command_prefix = []
            inst.config_path.write_bytes(original)
            inst.restart()
            _kill_processes_naming(str(inst.zygote_socket))
            assert host.wait_until(lambda: not host.mapping("/opt/hotrestart/"), 20), host.mapping("/opt/hotrestart/")

            # Uninstall: the original config byte for byte, and nothing of ours left.
            ulog = daemonset.run_until_logged(client, inst, tmp_path, uninstall, host_root, "hotrestart: uninstalled")
        assert (host_root / "etc/containerd/config.toml").read_bytes() == original
        for rel in ADDED[:2]:
            assert not (host_root / rel).exists(), (rel, ulog)
        assert _calls(host_root) == ["restart containerd", "restart containerd"]
        left = {k for k in _snapshot(host_root) if not k.startswith(("var/lib/hotrestart", SYSTEMCTL_LOG))}
        assert left == set(before), left ^ set(before)
    finally:
        client.remove_all(stop_timeout=0)
        client.close()
        inst.stop()
