"""The hostname of a restored container: its pod's, not the one in the checkpoint.

A pod's containers share its sandbox's UTS namespace, named by path in the spec, and runc
restores into it; but CRIU writes the dumped hostname into the namespace it restores into,
which renames the whole pod to the pod the checkpoint was taken in. The shim reads the pod's
hostname before the restore and puts it back right after, from a thread of its own that
joins the namespace and ends there (namespaces are per thread: the shim's other threads
never leave the host's). The host's namespace is never renamed.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger(__name__)

CLONE_NEWUTS = 0x04000000


def _same(a: str, b: str) -> bool:
    sa, sb = os.stat(a), os.stat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _pod_namespace(spec: Mapping[str, Any]) -> str:
    for ns in (spec.get("linux") or {}).get("namespaces") or []:
        if isinstance(ns, Mapping) and ns.get("type") == "uts" and isinstance(ns.get("path"), str):
            return str(ns["path"])
    return ""


def _in(ns_path: str, work: Callable[[ctypes.CDLL], bytes]) -> bytes:
    """`work` run in a new thread that has joined the UTS namespace at `ns_path`."""
    result: list[BaseException | bytes] = []

    def run() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(ns_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWUTS) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {ns_path}")
            finally:
                os.close(fd)
            result.append(work(libc))
        except BaseException as exc:  # handed to the caller's thread
            result.append(exc)

    thread = threading.Thread(target=run, name="uts")
    thread.start()
    thread.join()
    outcome = result[0] if result else OSError("the UTS thread ended without an outcome")
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def _set(name: bytes) -> Callable[[ctypes.CDLL], bytes]:
    def work(libc: ctypes.CDLL) -> bytes:
        if os.uname().nodename.encode() != name and libc.sethostname(name, len(name)) != 0:
            raise OSError(ctypes.get_errno(), "sethostname")
        return name

    return work


def pod_hostname(spec: Mapping[str, Any]) -> bytes | None:
    """The hostname of the pod's UTS namespace (None when the spec names none: the host's,
    with hostNetwork, or a new one). Read before a restore, which overwrites it."""
    pod_ns = _pod_namespace(spec)
    if not pod_ns:
        return None
    try:
        return _in(pod_ns, lambda _libc: os.uname().nodename.encode())
    except OSError as exc:
        log.warning("the pod's hostname cannot be read from %s: %s", pod_ns, exc)
        return None


def put_back(pid: int, spec: Mapping[str, Any], name: bytes | None) -> None:
    """After a restore: `name` (from `pod_hostname`) again in the pod's UTS namespace and in
    the restored process's, never in the host's. A failure is logged."""
    if name is None:
        return
    targets = [_pod_namespace(spec)] + ([f"/proc/{pid}/ns/uts"] if pid > 0 else [])
    done: list[str] = []
    for target in targets:
        try:
            if _same(target, "/proc/self/ns/uts") or any(_same(target, d) for d in done):
                continue
            _in(target, _set(name))
            done.append(target)
        except OSError as exc:
            log.warning("hostname of %s not put back after a restore: %s", target, exc)
