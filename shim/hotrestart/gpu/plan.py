"""Pure decisions about GPU state: which processes, may we, where to.

- Which processes of a container hold GPU state: those NVML lists on a device, and (so that
  it works without NVML) any whose memory maps include libcuda.so.
- May we checkpoint: cuda-checkpoint stages device memory in the process's host memory, so
  the host needs that much free.
- May we restore here: same model and count of GPUs, a driver at least as new, enough free
  device memory; devices that differ only by UUID are mapped (`--device-map`, r580+).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from hotrestart.gpu.inventory import Device, Inventory

LIBCUDA = re.compile(rb"/libcuda\.so(\.\d+)*\s*$", re.MULTILINE)
HOST_HEADROOM = 512 << 20


def maps_libcuda(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            return LIBCUDA.search(f.read()) is not None
    except OSError:
        return False


def gpu_pids(container_pids: Iterable[int], inventory: Inventory | None) -> list[int]:
    """The container's processes that hold GPU state, in pid order."""
    pids = set(container_pids)
    found = {p.pid for p in inventory.processes if p.pid in pids} if inventory else set()
    found |= {pid for pid in pids if pid not in found and maps_libcuda(pid)}
    return sorted(found)


def namespace_pid(pid: int) -> int:
    """`pid` as the container sees it (the last NSpid), which a restore keeps."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return int(line.split()[-1])
    except (OSError, ValueError):
        pass
    return pid


def device_memory_in_use(pids: Iterable[int], inventory: Inventory | None) -> int:
    wanted = set(pids)
    return sum(p.memory_used for p in inventory.processes if p.pid in wanted) if inventory else 0


def host_memory_problem(gpu_bytes: int, available: int) -> str:
    """Why the host cannot stage `gpu_bytes` of device memory; "" when it can."""
    if gpu_bytes and gpu_bytes + HOST_HEADROOM > available:
        return (
            f"GPU processes use {gpu_bytes >> 20} MiB of device memory but the host has only "
            f"{available >> 20} MiB available to stage it"
        )
    return ""


def record(pids: Iterable[int], inventory: Inventory | None, owner: str) -> dict[str, Any]:
    """The manifest's `gpu` section: inventory of the devices used, and the processes."""
    pids = list(pids)
    used = [p for p in (inventory.processes if inventory else ()) if p.pid in set(pids)]
    uuids = {p.uuid for p in used}
    devices = [d for d in (inventory.devices if inventory else ()) if d.uuid in uuids]
    return {
        "owner": owner,
        "driver": inventory.driver if inventory else "",
        "cuda_driver": inventory.cuda_driver if inventory else 0,
        "count": len(devices),
        "devices": [
            {"uuid": d.uuid, "name": d.name, "memory_total": d.memory_total, "memory_used": d.memory_used}
            for d in devices
        ],
        "processes": [
            {
                "pid": namespace_pid(pid),
                "memory_used": sum(p.memory_used for p in used if p.pid == pid),
                "uuids": sorted({p.uuid for p in used if p.pid == pid}),
            }
            for pid in pids
        ],
    }


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text))


def placement(recorded: Mapping[str, Any], here: Inventory | None) -> tuple[dict[str, str], str]:
    """(device map old->new, "") when a GPU checkpoint may restore on this node, else ({}, why not)."""
    devices = recorded.get("devices") or []
    if not recorded.get("processes"):
        return {}, ""
    if not devices:
        return {}, ""  # taken without NVML: nothing recorded to compare with
    if here is None:
        return {}, "the checkpoint holds GPU state but this node has no NVIDIA driver"
    if recorded.get("driver") and here.driver and _version(here.driver) < _version(str(recorded["driver"])):
        return {}, f"NVIDIA driver {here.driver} is older than {recorded['driver']} of the checkpoint"
    names = sorted(d["name"] for d in devices)
    available: list[Device] = list(here.devices)
    mapping: dict[str, str] = {}
    # Same UUID first (restoring on the same node), then any free device of the same model.
    for old in sorted(devices, key=lambda d: d["uuid"] not in {a.uuid for a in available}):
        model = [a for a in available if a.name == old["name"]]
        same = [a for a in model if a.uuid == old["uuid"]] or model
        if not same:
            have = sorted(a.name for a in here.devices)
            return {}, f"GPUs differ: the checkpoint used {names}, this node has {have}"
        new = same[0]
        available.remove(new)
        free = new.memory_total - new.memory_used
        if free < int(old.get("memory_used", 0)):
            return {}, f"GPU {new.uuid} has {free >> 20} MiB free, the checkpoint needs {old['memory_used'] >> 20} MiB"
        if new.uuid != old["uuid"]:
            mapping[old["uuid"]] = new.uuid
    return mapping, ""


def criu_cuda_plugin(criu_binary: str) -> str:
    """The CUDA plugin the installed CRIU would load, or "" (then the shim drives cuda-checkpoint).

    CRIU's plugin disables itself without an NVIDIA driver, so it is in charge only where
    /proc/driver/nvidia/gpus exists."""
    if not os.path.isdir("/proc/driver/nvidia/gpus"):
        return ""
    return find_cuda_plugin(criu_binary)


def find_cuda_plugin(criu_binary: str) -> str:
    prefix = os.path.dirname(os.path.dirname(os.path.realpath(criu_binary))) if criu_binary else "/usr"
    for d in (os.path.join(prefix, "lib", "criu"), "/usr/lib/criu", "/usr/local/lib/criu"):
        path = os.path.join(d, "cuda_plugin.so")
        if os.path.exists(path):
            return path
    return ""
