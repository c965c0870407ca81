"""Addresses of a pod's network namespace, read with pyroute2 (netlink, no `ip` binary)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def netns_path(spec: Mapping[str, Any]) -> str:
    for ns in (spec.get("linux") or {}).get("namespaces") or []:
        if ns.get("type") == "network":
            return str(ns.get("path") or "")
    return ""


def addresses(netns: str) -> list[str]:
    """Global addresses ("addr/prefix") in `netns`, loopback excluded; [] for the host netns."""
    if not netns:
        return []
    from pyroute2 import NetNS  # type: ignore[import-untyped]  # heavy: imported only when needed

    with NetNS(netns) as ns:
        found = []
        for msg in ns.get_addr():
            addr = msg.get_attr("IFA_ADDRESS")
            if not addr or addr.startswith("127.") or addr == "::1" or addr.startswith("fe80:"):
                continue
            found.append(f"{addr}/{msg['prefixlen']}")
    return sorted(found)
