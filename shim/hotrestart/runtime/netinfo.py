"""Addresses of a pod's network namespace, read with pyroute2 over netlink.

The netlink socket is opened from a short-lived thread that has joined the pod's network
namespace (setns affects only the calling thread) and goes back at once. pyroute2's own
netns support forks a helper and later signals it; in a forked copy of the shim that
signal would reach the shim's event loop through the shared wakeup fd and stop it.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Mapping
from typing import Any

CLONE_NEWNET = 0x40000000


def netns_path(spec: Mapping[str, Any]) -> str:
    for ns in (spec.get("linux") or {}).get("namespaces") or []:
        if ns.get("type") == "network":
            return str(ns.get("path") or "")
    return ""


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _read(netns: str, out: list[str], errors: list[BaseException]) -> None:
    from pyroute2 import IPRoute  # type: ignore[import-untyped]  # heavy: imported only when needed

    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    target = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        try:
            ipr = IPRoute()  # the netlink socket belongs to the pod's namespace from now on
        finally:
            _setns(own)
        with ipr:
            for msg in ipr.get_addr():
                addr = msg.get_attr("IFA_ADDRESS")
                if not addr or addr.startswith("127.") or addr == "::1" or addr.startswith("fe80:"):
                    continue
                out.append(f"{addr}/{msg['prefixlen']}")
    except BaseException as exc:
        errors.append(exc)
    finally:
        os.close(own)
        os.close(target)


def addresses(netns: str) -> list[str]:
    """Global addresses ("addr/prefix") in `netns`, loopback excluded; [] for the host netns."""
    if not netns:
        return []
    found: list[str] = []
    errors: list[BaseException] = []
    worker = threading.Thread(target=_read, args=(netns, found, errors), name="netns-read", daemon=True)
    worker.start()
    worker.join()
    if errors:
        raise errors[0]
    return sorted(found)
