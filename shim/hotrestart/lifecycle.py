"""The short-lived shim verbs: `start` (find or launch the pod's shim) and `delete`.

`start` must print only the socket address and must not leave containerd's output pipes
open, so the daemon gets /dev/null for stdio and its own session. One shim serves a pod:
containers are grouped by the CRI sandbox id, as containerd's runc shim does, and a second
`start` for the same pod reuses the running shim.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import posixpath
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from hotrestart.handoff import INIT_PID_FILE, LISTEN_FD_ENV, OPTIONS_FILE

if TYPE_CHECKING:
    from hotrestart.shim_main import Flags

SOCKET_DIR = "/run/containerd/s"
GROUP_ANNOTATIONS = ("io.containerd.runc.v2.group", "io.kubernetes.cri.sandbox-id")


def group_id(bundle: str, cid: str) -> str:
    try:
        with open(os.path.join(bundle, "config.json")) as f:
            annotations = json.load(f).get("annotations") or {}
    except (OSError, ValueError):
        annotations = {}
    for key in GROUP_ANNOTATIONS:
        if annotations.get(key):
            return str(annotations[key])
    return cid


def socket_path(address: str, namespace: str, group: str) -> str:
    joined = posixpath.normpath(posixpath.join(address, namespace, group))
    return posixpath.join(SOCKET_DIR, hashlib.sha256(joined.encode()).hexdigest())


def write_address(bundle: str, address: str) -> None:
    tmp = os.path.join(bundle, ".address.tmp")
    with open(tmp, "w") as f:
        f.write(address)
    os.replace(tmp, os.path.join(bundle, "address"))


def _answers(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.1)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def listen(path: str) -> socket.socket | None:
    """Bind the pod's socket, or None when a live shim already owns it."""
    os.makedirs(SOCKET_DIR, mode=0o711, exist_ok=True)
    for _ in range(3):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old = os.umask(0o177)
            try:
                sock.bind(path)
            finally:
                os.umask(old)
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE:
                raise
            if _answers(path):
                return None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            continue
        os.chmod(path, 0o600)
        sock.listen(128)
        return sock
    raise OSError(errno.EADDRINUSE, f"cannot bind shim socket {path}")


def start(flags: Flags) -> None:
    bundle = os.getcwd()
    path = socket_path(flags.address, flags.namespace, group_id(bundle, flags.id))
    address = "unix://" + path
    sock = listen(path)
    if sock is None:
        write_address(bundle, address)
        sys.stdout.write(address)
        return
    try:
        _launch_daemon(flags, bundle, sock)
        write_address(bundle, address)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    finally:
        sock.close()
    sys.stdout.write(address)


def _launch_daemon(flags: Flags, bundle: str, sock: socket.socket) -> None:
    """Start this shim in a fresh interpreter (used when no zygote is available)."""
    argv = [sys.executable, "-m", "hotrestart.shim_main", "-namespace", flags.namespace, "-id", flags.id]
    argv += ["-address", flags.address]
    if flags.publish_binary:
        argv += ["-publish-binary", flags.publish_binary]
    if flags.debug:
        argv.append("-debug")
    env = dict(os.environ, **{LISTEN_FD_ENV: str(sock.fileno())})
    subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        pass_fds=(sock.fileno(),),
        cwd=bundle,
        env=env,
        start_new_session=True,
    )


def delete(flags: Flags) -> None:
    """Clean up after a shim that is gone: force-delete the container, unmount, report 137."""
    from hotrestart.api.containerd.task.v2 import shim_pb2
    from hotrestart.runtime import mounts
    from hotrestart.runtime.runc import DEFAULT_ROOT, RuncArgv

    bundle = flags.bundle or os.getcwd()
    binary, root = "runc", DEFAULT_ROOT
    with contextlib.suppress(OSError, ValueError, AttributeError):
        with open(os.path.join(bundle, OPTIONS_FILE)) as f:
            saved = json.load(f)
        binary = str(saved.get("binary_name") or binary)
        root = str(saved.get("root") or root)
    runc = RuncArgv(binary=binary, root=os.path.join(root, flags.namespace))
    # No event loop here: run synchronously, and report runc's complaint on our stderr.
    try:
        result = subprocess.run(runc.delete_argv(flags.id, force=True), capture_output=True, check=False)
        if result.returncode != 0:
            sys.stderr.write(result.stderr.decode(errors="replace"))
    except OSError as exc:  # no runc to run: the rest of the clean-up still applies
        sys.stderr.write(f"runc delete: {exc}\n")
    try:
        mounts.unmount_all(os.path.join(bundle, "rootfs"))
    except OSError as exc:
        sys.stderr.write(f"unmount rootfs: {exc}\n")
    pid = 0
    with contextlib.suppress(OSError, ValueError):
        with open(os.path.join(bundle, INIT_PID_FILE)) as f:
            pid = int(f.read().strip())
    reply = shim_pb2.DeleteResponse(pid=pid, exit_status=128 + 9)
    reply.exited_at.FromNanoseconds(time.time_ns())
    sys.stdout.buffer.write(reply.SerializeToString())
    sys.stdout.flush()


def print_info() -> None:
    from hotrestart import __version__

    # RuntimeInfo{name=1, version=2}; hand-encoded to keep this verb free of generated code.
    def field(num: int, value: bytes) -> bytes:
        return bytes([num << 3 | 2, len(value)]) + value

    version = field(1, __version__.encode()) + field(2, b"")
    sys.stdout.buffer.write(field(1, b"io.containerd.hotrestart.v2") + field(2, version))
