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
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import host
from .images import BUSYBOX_IMAGE, PAUSE_IMAGE, build_images

TESTBED = Path(os.environ.get("HOTRESTART_TESTBED", "/opt/hotrestart-testbed"))
BIN_DIR = TESTBED / "bin"
CONTAINERD_17_BIN_DIR = TESTBED / "containerd-1.7" / "bin"
CNI_BIN_DIR = Path("/usr/lib/cni")
LOCK_DIR = Path("/run/hotrestart-testbed")
NAMESPACE = "k8s.io"
HOTRESTART_RUNTIME_TYPE = "io.containerd.hotrestart.v2"
RUNC_RUNTIME_TYPE = "io.containerd.runc.v2"
SHIM_PREFIX = "containerd-shim"
# Set in containerd's environment, hence in every shim's (and the shim
# zygote's): identifies the runtime processes of an instance even when their
# command line does not name it.
MARKER_ENV = "HOTRESTART_TESTBED_INSTANCE"
# The hotrestart shim forks pod shims from a zygote listening here; one per
# instance keeps instances (and test runs) apart and lets stop() end it.
ZYGOTE_SOCKET_ENV = "HOTRESTART_ZYGOTE_SOCKET"
MAX_NET_SLOTS = 32
SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes with the NUL


class TestbedError(RuntimeError):
    pass


# -- TOML ------------------------------------------------------------------------


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str | Path):
        return json.dumps(str(v))
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML for {v!r}")


def to_toml(data: Mapping[str, Any], _prefix: tuple[str, ...] = ()) -> str:
    """Serialise nested dicts of scalars and lists (enough for containerd)."""
    lines: list[str] = []
    tables = []
    for k, v in data.items():
        if isinstance(v, Mapping):
            tables.append((k, v))
        else:
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
    out = "\n".join(lines)
    for k, v in tables:
        path = (*_prefix, k)
        header = "[" + ".".join(_toml_key(p) for p in path) + "]"
        body = to_toml(v, path)
        out += ("\n\n" if out else "") + header + ("\n" + body if body else "")
    return out


# -- instance ----------------------------------------------------------------------


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
        self.cgroup_parent = f"/hrtb-{self.tag}"
        self.cni_network = f"hrtb-{self.tag}"
        self.namespace = NAMESPACE
        self.extra_env = dict(env or {})
        self.runc_options = dict(runc_options or {})
        # None: Root under our state dir (like runc's) and a checkpoint store of this
        # instance (or the shared one given); {}: send no options at all.
        self.store = Path(store) if store else self.dir / "store"
        self.hotrestart_options = (
            {"Root": str(self.state / "runc"), "CheckpointStore": str(self.store)}
            if hotrestart_options is None
            else dict(hotrestart_options)
        )
        self.zygote_socket = self.dir / "zygote.sock"
        self.images_tar = images
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.bridge: str | None = None
        self.subnet: str | None = None
        self._net_lock: int | None = None
        self._dir_lock: int | None = None
        self._configured = False
        self._stopped = False
        self._known_ids: set[str] = set()
        self._log_fh: Any = None
        self._dir_lock = _lock_file(self.dir / ".lock", blocking=True)
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
            self._import_images()
        self._wait_cri_ready()
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
            [str(self.binaries_dir / "containerd"), "--config", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            env=self.env(),
            start_new_session=True,  # ^C in pytest must not reach it
            cwd=str(self.dir),
        )
        self._wait_version()

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
        self._wait_cri_ready()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cri(self, timeout: float = 60.0) -> Any:
        """A new CRIClient on this instance (close it when done)."""
        from cri.client import CRIClient

        return CRIClient(self.address, timeout=timeout)

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
        env["PATH"] = ":".join(path)
        env[MARKER_ENV] = str(self.dir)
        env[ZYGOTE_SOCKET_ENV] = str(self.zygote_socket)
        env.update(self.extra_env)
        return env

    def pod_cgroup_parent(self, uid: str) -> str:
        """A kubelet-style (cgroupfs) pod cgroup below this instance's parent."""
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
        return _instance_processes(str(self.dir))

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
            problems += self._cri_teardown()
        self.stop_daemon()
        problems += _cleanup(self._info())
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
    def reap_stale(base: str | Path = "/tmp") -> list[str]:
        """Clean up instance dirs under ``base`` whose owner died; returns them."""
        reaped = []
        for d in sorted(Path(base).glob("hrtb-*")):
            info_file = d / "instance.json"
            if not info_file.is_file():
                continue
            try:
                fd = _lock_file(d / ".lock", blocking=False)
            except BlockingIOError:
                continue  # alive
            except OSError:
                continue
            net_lock = None
            try:
                info = json.loads(info_file.read_text())
                # The dead owner's network slot may have gone to a live
                # instance since: only touch the bridge while holding its lock.
                slot = info.get("net_slot")
                if slot is not None:
                    with contextlib.suppress(OSError):
                        net_lock = _lock_file(LOCK_DIR / f"net{slot}.lock", blocking=False)
                _cleanup(info, delete_bridge=net_lock is not None)
            except (OSError, ValueError, KeyError):
                pass
            finally:
                if net_lock is not None:
                    os.close(net_lock)
                os.close(fd)
            shutil.rmtree(d, ignore_errors=True)
            reaped.append(str(d))
        return reaped

    # -- internals ----------------------------------------------------------------------

    def _info(self) -> dict[str, Any]:
        return {
            "dir": str(self.dir),
            "address": str(self.address),
            "cgroup_parent": self.cgroup_parent,
            "cni_network": self.cni_network,
            "bridge": self.bridge,
            "net_slot": self._slot,
            "known_ids": sorted(self._known_ids),
        }

    _slot: int | None = None

    def _allocate_network(self) -> None:
        LOCK_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        for slot in range(MAX_NET_SLOTS):
            try:
                fd = _lock_file(LOCK_DIR / f"net{slot}.lock", blocking=False)
            except BlockingIOError:
                continue
            self._net_lock = fd
            self._slot = slot
            self.bridge = f"hrtest{slot}"
            self.subnet = f"10.88.{77 + slot}.0/24"
            # A bridge without a lock holder is left over from a killed run.
            host.delete_link(self.bridge)
            return
        raise TestbedError(f"all {MAX_NET_SLOTS} test bed network slots are in use")

    def _write_config(self) -> None:
        for d in (self.root, self.state, self.cni_conf_dir, self.cni_data_dir, self.dir / "tmp"):
            d.mkdir(mode=0o711, parents=True, exist_ok=True)
        conflist = {
            "cniVersion": "1.0.0",
            "name": self.cni_network,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": self.subnet}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(self.cni_data_dir),
                    },
                }
            ],
        }
        (self.cni_conf_dir / "10-hrtest.conflist").write_text(json.dumps(conflist, indent=2) + "\n")
        cfg = self._config_v2() if self.is_1_7 else self._config_v3()
        self.config_path.write_text(to_toml(cfg) + "\n")
        (self.dir / "instance.json").write_text(json.dumps(self._info(), indent=2) + "\n")

    def _runtimes(self) -> dict[str, Any]:
        runc: dict[str, Any] = {
            "runtime_type": RUNC_RUNTIME_TYPE,
            "options": {
                "Root": str(self.state / "runc"),
                "SystemdCgroup": False,
                **self.runc_options,
            },
        }
        hot: dict[str, Any] = {
            "runtime_type": HOTRESTART_RUNTIME_TYPE,
            "pod_annotations": ["hotrestart.io/*"],
            "container_annotations": ["hotrestart.io/*"],
        }
        if self.hotrestart_options:
            hot["options"] = dict(self.hotrestart_options)
        if self.is_1_7:
            runc["sandbox_mode"] = "podsandbox"
            hot["sandbox_mode"] = "podsandbox"
        return {"runc": runc, "hotrestart": hot}

    def _common(self, version: int, disabled: list[str]) -> dict[str, Any]:
        return {
            "version": version,
            "root": str(self.root),
            "state": str(self.state),
            "temp": str(self.dir / "tmp"),
            "disabled_plugins": disabled,
            "grpc": {"address": str(self.address)},
            "ttrpc": {"address": str(self.ttrpc_address)},
            "debug": {"level": self.log_level},
        }

    def _config_v3(self) -> dict[str, Any]:
        """containerd 2.x: CRI split into cri.v1.images / cri.v1.runtime / grpc.v1.cri."""
        cfg = self._common(
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
            "io.containerd.internal.v1.opt": {"path": str(self.dir / "opt")},
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
                    "runtimes": self._runtimes(),
                },
                "cni": {
                    "bin_dirs": [str(CNI_BIN_DIR)],
                    "conf_dir": str(self.cni_conf_dir),
                    "max_conf_num": 1,
                },
            },
        }
        return cfg

    def _config_v2(self) -> dict[str, Any]:
        """containerd 1.7: everything CRI lives in plugins."io.containerd.grpc.v1.cri"."""
        cfg = self._common(
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
            "io.containerd.internal.v1.opt": {"path": str(self.dir / "opt")},
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
                    "runtimes": self._runtimes(),
                },
                "cni": {
                    "bin_dir": str(CNI_BIN_DIR),
                    "conf_dir": str(self.cni_conf_dir),
                    "max_conf_num": 1,
                },
            },
        }
        return cfg

    def _check_alive(self, what: str) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise TestbedError(
                f"containerd exited ({self.proc.returncode}) while {what}; log {self.log_path}:\n{self.log_tail()}"
            )

    def _wait_version(self) -> None:
        from cri.client import CRIClient

        deadline = time.monotonic() + self.start_timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            self._check_alive("starting")
            if self.address.exists():
                with CRIClient(self.address, timeout=2) as c:
                    try:
                        c.version(timeout=2)
                        return
                    except Exception as e:  # grpc.RpcError, mostly UNAVAILABLE
                        last = e
            time.sleep(0.05)
        raise TestbedError(f"CRI of {self} did not answer in {self.start_timeout}s ({last}); log:\n{self.log_tail()}")

    def _wait_cri_ready(self) -> None:
        from cri.client import CRIClient

        deadline = time.monotonic() + self.start_timeout
        conds: dict[str, bool] = {}
        with CRIClient(self.address, timeout=5) as c:
            while time.monotonic() < deadline:
                self._check_alive("waiting for the CRI")
                with contextlib.suppress(Exception):
                    conds = {x.type: x.status for x in c.status().status.conditions}
                    if conds.get("RuntimeReady") and conds.get("NetworkReady"):
                        return
                time.sleep(0.05)
        raise TestbedError(f"CRI of {self} not ready: {conds}; log:\n{self.log_tail()}")

    def _import_images(self) -> None:
        if self.images_tar is None:
            self.images_tar = build_images(self.dir / "images.tar")
        # --local: unpack client-side into the default (overlayfs) snapshotter,
        # the same way on 1.7 and 2.x.
        self.ctr("images", "import", "--local", str(self.images_tar))
        from cri.client import CRIClient

        with CRIClient(self.address, timeout=5) as c:
            ok = host.wait_until(
                lambda: all(c.image_status(ref).id for ref in (BUSYBOX_IMAGE, PAUSE_IMAGE)),
                timeout=30,
                interval=0.1,
            )
        if not ok:
            raise TestbedError(f"the CRI does not see the imported images; log:\n{self.log_tail()}")

    def _cri_teardown(self) -> list[str]:
        from cri.client import CRIClient

        problems = []
        try:
            with CRIClient(self.address, timeout=30) as c:
                with contextlib.suppress(Exception):
                    self._known_ids.update(x.id for x in c.list_containers())
                    self._known_ids.update(x.id for x in c.list_pod_sandboxes())
                problems += [f"CRI teardown: {e}" for e in c.remove_all(stop_timeout=1)]
        except Exception as e:
            problems.append(f"CRI teardown failed: {e}")
        return problems


def _lock_file(path: Path, blocking: bool) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _instance_processes(dir_: str) -> list[host.Proc]:
    procs = host.processes()
    me = os.getpid()
    roots = {
        p.pid
        for p in procs
        if p.pid != me
        and (
            any(a == dir_ or a.startswith(dir_ + "/") for a in p.cmdline) or host.environ(p.pid).get(MARKER_ENV) == dir_
        )
    }
    tree = host.descendants(roots, procs) - {me}
    return [p for p in procs if p.pid in tree]


def _cgroup_members(prefixes: Sequence[str], ids: set[str]) -> set[int]:
    """Pids in a cgroup below one of ``prefixes`` or named after one of ``ids``."""
    pids = set()
    for p in host.processes():
        for _, path in host.cgroups_of(p.pid):
            if any(path == pre or path.startswith(pre + "/") for pre in prefixes) or (os.path.basename(path) in ids):
                pids.add(p.pid)
                break
    return pids


def _cleanup(info: Mapping[str, Any], delete_bridge: bool = True) -> list[str]:
    """Kill, unmount and remove what an instance left behind (containerd stopped)."""
    problems: list[str] = []
    dir_ = info["dir"]
    ids = set(info.get("known_ids") or ()) | _task_ids(Path(dir_))
    prefixes = [info["cgroup_parent"]]

    # 1. Processes: anything naming our directory (containerd, shims, runc,
    #    criu) with its descendants (containers), plus whatever sits in our
    #    cgroups (containers that were re-parented away from a dead shim).
    victims = {p.pid for p in _instance_processes(dir_)}
    victims |= _cgroup_members(prefixes, ids)
    sockets = {s for s in host.unix_socket_paths(victims) if s.startswith(("/run/containerd/s/", dir_ + "/"))}
    left = host.kill_all(victims)
    if left:
        problems.append(f"processes survived SIGKILL: {sorted(left)}")
    for s in sockets:
        with contextlib.suppress(OSError):
            os.unlink(s)

    # 2. Mounts (rootfs, shm, netns bind mounts under state/netns).
    remaining = host.unmount_all(dir_)
    if remaining:
        problems.append(f"still mounted: {remaining}")

    # 3. cgroups: our parent tree, and /k8s.io/<id> for pods run without one.
    cg = [*prefixes, *(f"/{NAMESPACE}/{i}" for i in ids)]
    busy = host.remove_cgroup_trees(cg)
    if busy:
        problems.append(f"cgroups not removable: {busy[:5]}")

    # 4. Network: our bridge and libcni's cached results for our network.
    if delete_bridge and info.get("bridge"):
        host.delete_link(info["bridge"])
    _remove_cni_cache(info.get("cni_network"), dir_)
    return problems


def _task_ids(dir_: Path) -> set[str]:
    """Ids of the tasks (containers, sandboxes) in an instance's state dir."""
    ids: set[str] = set()
    for ns in (dir_ / "state" / "io.containerd.runtime.v2.task").glob("*"):
        with contextlib.suppress(OSError):
            ids.update(d.name for d in ns.iterdir())
    return ids


def _remove_cni_cache(network: str | None, dir_: str) -> None:
    """libcni keeps results in /var/lib/cni/results until CNI DEL; drop ours:
    those of our network and the CRI's loopback ones for our netns files."""
    for cache in Path("/var/lib/cni/results").glob("*"):
        try:
            if network and cache.name.startswith(network + "-"):
                cache.unlink()
                continue
            netns = json.loads(cache.read_text()).get("netns", "")
            if isinstance(netns, str) and netns.startswith(dir_ + "/"):
                cache.unlink()
        except (OSError, ValueError, AttributeError):
            pass
