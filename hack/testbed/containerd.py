"""A private containerd (2.x or 1.7) for the end-to-end tests.

Each ContainerdInstance owns one directory (``/tmp/hrtb-<tag>`` by default)
holding its config, root, state, sockets, CNI config and IPAM data, and it
owns:

* the cgroup parent ``/hrtb-<tag>`` (pods made with ``pod_config()`` or
  ``CRIClient.pod_config(cgroup_parent=instance.pod_cgroup_parent(uid))``
  live below it),
* one CNI bridge (``hrtest<N>`` on 10.88.<77+N>.0/24), N being the lowest
  slot whose lock in /run/hotrestart-testbed is free,
* every process whose command line names its directory (containerd, the
  shims' ``-address``) and all their descendants (the containers).

``stop()`` removes all of that again, even when the runtime misbehaves: CRI
teardown first, then SIGTERM to containerd, then SIGKILL for anything left,
unmounting, cgroup and link removal.  ``restart()`` only restarts the daemon
and leaves the pods running, for re-attach tests.  ``reap_stale()`` cleans up
after instances of a test run that was killed.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import cleanup, host, readiness
from .config import cni_conflist, containerd_config
from .errors import TestbedError
from .layout import BIN_DIR, CGROUP_DRIVER_ENV, MARKER_ENV, NAMESPACE, SUN_PATH_MAX, ZYGOTE_SOCKET_ENV
from .locks import claim_net_slot, lock_file
from .toml_writer import to_toml


def containerd_major(binaries_dir: Path) -> int:
    out = subprocess.run(
        [str(binaries_dir / "containerd"), "--version"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    m = re.search(r"\sv?(\d+)\.(\d+)\.\d+", out)
    if not m:
        raise TestbedError(f"cannot parse containerd version: {out!r}")
    return int(m.group(1))


class ContainerdInstance:
    """One private containerd with the CRI plugin, runc and hotrestart handlers."""

    def __init__(
        self,
        tmpdir: str | Path | None = None,
        binaries_dir: str | Path = BIN_DIR,
        shim_bin_dir: str | Path | None = None,
        *,
        log_dir: str | Path | None = None,
        log_level: str = "info",
        env: Mapping[str, str] | None = None,
        runc_options: Mapping[str, Any] | None = None,
        hotrestart_options: Mapping[str, Any] | None = None,
        store: str | Path | None = None,
        images: Path | None = None,
        start_timeout: float = 60.0,
        command_prefix: list[str] | None = None,
        path: list[str] | None = None,
        register_hotrestart: bool = True,
        cgroup_driver: str | None = None,
    ) -> None:
        self.binaries_dir = Path(binaries_dir)
        if not (self.binaries_dir / "containerd").exists():
            raise TestbedError(f"no containerd in {self.binaries_dir}")
        self.major = containerd_major(self.binaries_dir)
        self.shim_bin_dir = Path(shim_bin_dir) if shim_bin_dir else None
        self.tag = secrets.token_hex(4)
        base = Path(tmpdir) if tmpdir else Path("/tmp")
        self.dir = base / f"hrtb-{self.tag}"
        self.dir.mkdir(mode=0o711, parents=False)
        self.address = self.dir / "c.sock"
        self.ttrpc_address = self.dir / "t.sock"
        if len(os.fsencode(self.address)) > SUN_PATH_MAX - 20:
            # Leave room: shims put their own sockets next to such paths.
            shutil.rmtree(self.dir)
            raise TestbedError(f"{self.address} is too long for a unix socket; use a shorter tmpdir")
        self.root = self.dir / "root"
        self.state = self.dir / "state"
        self.config_path = self.dir / "config.toml"
        self.cni_conf_dir = self.dir / "cni"
        self.cni_data_dir = self.dir / "cni-ipam"
        self.log_path = Path(log_dir) / f"containerd-{self.tag}.log" if log_dir else self.dir / "containerd.log"
        self.log_level = log_level
        # "systemd" (SystemdCgroup = true, the kubeadm default) or "cgroupfs".
        self.cgroup_driver = cgroup_driver or os.environ.get(CGROUP_DRIVER_ENV) or "cgroupfs"
        if self.cgroup_driver not in ("systemd", "cgroupfs"):
            raise TestbedError(f"unknown cgroup driver {self.cgroup_driver!r}")
        self.systemd = self.cgroup_driver == "systemd"
        # Under systemd a slice of its own (no dash in the name: a dash nests slices); the
        # path is where it lies in the hierarchy.
        self.slice = f"hrtb{self.tag}.slice" if self.systemd else ""
        self.cgroup_parent = f"/{self.slice}" if self.systemd else f"/hrtb-{self.tag}"
        self.cni_network = f"hrtb-{self.tag}"
        self.namespace = NAMESPACE
        self.extra_env = dict(env or {})
        self.runc_options = dict(runc_options or {})
        # None: Root under our state dir (like runc's) and a checkpoint store of this
        # instance (or the shared one given); {}: send no options at all.
        # An s3:// URL is passed through as it is (`store` then stays a local path nobody uses).
        self.store_url = str(store) if store and "://" in str(store) else ""
        self.store = Path(store) if store and not self.store_url else self.dir / "store"
        self.hotrestart_options = (
            {"Root": str(self.state / "runc"), "CheckpointStore": self.store_url or str(self.store)}
            if hotrestart_options is None
            else dict(hotrestart_options)
        )
        if self.systemd and self.hotrestart_options:
            self.hotrestart_options.setdefault("SystemdCgroup", True)
        self.zygote_socket = self.dir / "zygote.sock"
        self.images_tar = images
        self.start_timeout = start_timeout
        # containerd runs as `prefix + [containerd, ...]` (a prefix that ends by exec'ing it, e.g.
        # into a mount namespace of its own); `path` replaces the PATH it and its shims get.
        self.command_prefix = list(command_prefix or [])
        self.path = list(path) if path is not None else None
        # False: the config registers runc only (as on a node before the installer ran).
        self.register_hotrestart = register_hotrestart
        self.proc: subprocess.Popen[bytes] | None = None
        self.bridge: str | None = None
        self.subnet: str | None = None
        self._net_lock: int | None = None
        self._dir_lock: int | None = None
        self._configured = False
        self._stopped = False
        self._known_ids: set[str] = set()
        self._log_fh: Any = None
        self._dir_lock = lock_file(self.dir / ".lock", blocking=True)
        atexit.register(self.stop)

    # -- public API -------------------------------------------------------------------

    @property
    def is_1_7(self) -> bool:
        return self.major < 2

    def __enter__(self) -> ContainerdInstance:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<ContainerdInstance {self.major}.x {self.dir}>"

    def start(self) -> ContainerdInstance:
        """Configure (first time), start containerd, import images, wait for the CRI."""
        if self._stopped:
            raise TestbedError("instance was stopped; make a new one")
        first = not self._configured
        if first:
            self._allocate_network()
            self._write_config()
            self._configured = True
        self.start_daemon()
        if first:
            readiness.import_images(self)
        readiness.wait_cri_ready(self)
        return self

    def start_daemon(self) -> None:
        """Start the containerd process and wait until its gRPC API answers."""
        if self.proc is not None and self.proc.poll() is None:
            raise TestbedError("containerd is already running")
        for sock in (self.address, self.ttrpc_address):
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
        self._log_fh = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*self.command_prefix, str(self.binaries_dir / "containerd"), "--config", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            env=self.env(),
            start_new_session=True,  # ^C in pytest must not reach it
            cwd=str(self.dir),
        )
        readiness.wait_api(self)

    def stop_daemon(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        """Stop only the containerd process; shims and containers keep running."""
        p = self.proc
        if p is None:
            return
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(sig)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        self.proc = None
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    def kill_daemon(self) -> None:
        """SIGKILL containerd (simulates a crash); shims and containers stay."""
        self.stop_daemon(signal.SIGKILL)

    def restart(self, sig: int = signal.SIGTERM) -> None:
        """Restart containerd with the same config and state; pods keep running."""
        self.stop_daemon(sig)
        self.start_daemon()
        readiness.wait_cri_ready(self)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cri(self, timeout: float = host.CRI_REQUEST_TIMEOUT) -> Any:
        """A new CRIClient on this instance (close it when done)."""
        from cri.client import CRIClient

        return CRIClient(self.address, timeout=timeout * host.TIME_SCALE)

    def ctr(
        self,
        *args: str,
        namespace: str | None = None,
        check: bool = True,
        timeout: float = 120.0,
        input: bytes | None = None,
    ) -> subprocess.CompletedProcess[Any]:
        """Run this instance's ``ctr`` against it: ``inst.ctr("tasks", "ls")``."""
        cmd = [
            str(self.binaries_dir / "ctr"),
            "--address",
            str(self.address),
            "--namespace",
            namespace or self.namespace,
            *args,
        ]
        p = subprocess.run(
            cmd,
            capture_output=True,
            text=input is None,
            input=input,
            env=self.env(),
            timeout=timeout,
            check=False,
        )
        if check and p.returncode != 0:
            raise TestbedError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr}")
        return p

    def env(self) -> dict[str, str]:
        """Environment of containerd (and so of the shims it starts)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONTAINERD_")}
        env.pop("NOTIFY_SOCKET", None)
        path = [str(self.binaries_dir)]
        if self.binaries_dir != BIN_DIR:
            path.append(str(BIN_DIR))  # runc and criu for containerd 1.7
        if self.shim_bin_dir:
            path.append(str(self.shim_bin_dir))
        path.append(os.environ.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"))
        env["PATH"] = ":".join(path if self.path is None else self.path)
        env[MARKER_ENV] = str(self.dir)
        env[ZYGOTE_SOCKET_ENV] = str(self.zygote_socket)
        env.update(self.extra_env)
        return env

    def pod_cgroup_parent(self, uid: str) -> str:
        """A kubelet-style pod cgroup below this instance's parent: a path for cgroupfs, a
        slice for systemd (as the kubelet's `kubepods-besteffort-pod<uid>.slice`)."""
        if self.systemd:
            return f"{self.slice.removesuffix('.slice')}-pod{uid.replace('-', '_')}.slice"
        return f"{self.cgroup_parent}/pod{uid.replace('-', '_')}"

    def read_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.read_log().splitlines()[-lines:])

    def processes(self) -> list[host.Proc]:
        """Live processes of this instance: containerd, shims, containers."""
        return cleanup.instance_processes(str(self.dir))

    def shim_processes(self) -> list[host.Proc]:
        """Live shims of this instance (and the runc/criu they run at the moment).

        That is: processes whose ``-address`` is ours or that carry our marker
        in their environment, except containerd itself and the shim zygote
        (the process listening on ``zygote_socket``, alive until stop()).
        """
        addr, d, cfg = str(self.address), str(self.dir), str(self.config_path)
        procs = [
            p
            for p in host.processes()
            if p.arg_after("-address") == addr
            or p.arg_after("--address") == addr
            or host.environ(p.pid).get(MARKER_ENV) == d
        ]
        procs = [p for p in procs if p.arg_after("--config") != cfg and p.pid != os.getpid()]
        zygote = host.socket_holders(self.zygote_socket, [p.pid for p in procs])
        return [p for p in procs if p.pid not in zygote]

    def remember_ids(self, *ids: str) -> None:
        """Note container/sandbox ids whose default cgroups (/k8s.io/ID) are ours."""
        self._known_ids.update(ids)

    def stop(self) -> list[str]:
        """Tear everything down; returns the problems met (also on the second call: [])."""
        if self._stopped:
            return []
        self._stopped = True
        problems: list[str] = []
        if self.running:
            problems += cleanup.cri_teardown(self.address, self._known_ids)
        self.stop_daemon()
        problems += cleanup.cleanup(self._info())
        if self._net_lock is not None:
            os.close(self._net_lock)
            self._net_lock = None
        if self._dir_lock is not None:
            os.close(self._dir_lock)
            self._dir_lock = None
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.dir.exists():
            problems.append(f"could not remove {self.dir}")
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        return problems

    @staticmethod
    @staticmethod
    def reap_stale(base: str | Path = "/tmp") -> list[str]:
        """Clean up instance dirs under ``base`` whose owner died; returns them."""
        return cleanup.reap_stale(base)

    # -- internals ----------------------------------------------------------------------

    def _info(self) -> dict[str, Any]:
        return {
            "dir": str(self.dir),
            "address": str(self.address),
            "cgroup_parent": self.cgroup_parent,
            "slice": self.slice,
            "cni_network": self.cni_network,
            "bridge": self.bridge,
            "net_slot": self._slot,
            "known_ids": sorted(self._known_ids),
        }

    _slot: int | None = None

    def _allocate_network(self) -> None:
        slot, self._net_lock = claim_net_slot()
        self._slot = slot
        self.bridge = f"hrtest{slot}"
        self.subnet = f"10.88.{77 + slot}.0/24"
        # A bridge without a lock holder is left over from a killed run.
        host.delete_link(self.bridge)

    def _write_config(self) -> None:
        for d in (self.root, self.state, self.cni_conf_dir, self.cni_data_dir, self.dir / "tmp"):
            d.mkdir(mode=0o711, parents=True, exist_ok=True)
        (self.cni_conf_dir / "10-hrtest.conflist").write_text(json.dumps(cni_conflist(self), indent=2) + "\n")
        self.config_path.write_text(to_toml(containerd_config(self)) + "\n")
        (self.dir / "instance.json").write_text(json.dumps(self._info(), indent=2) + "\n")

    def check_alive(self, what: str) -> None:
        """Raise if containerd has exited (while doing ``what``), with its log's tail."""
        if self.proc is not None and self.proc.poll() is not None:
            raise TestbedError(
                f"containerd exited ({self.proc.returncode}) while {what}; log {self.log_path}:\n{self.log_tail()}"
            )
