"""What GPUs a node has and which processes use them: the project's NVML seam.

`nvml_inventory()` asks the driver through pynvml (nvidia-ml-py). A node without the driver
has no inventory; `HOTRESTART_GPU_INVENTORY` may name a JSON file with one instead (a node
whose driver NVML cannot reach, and the test bed's stand-in GPU). Unit tests pass their own
`Inventory`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any

INVENTORY_ENV = "HOTRESTART_GPU_INVENTORY"


@dataclasses.dataclass(frozen=True)
class Device:
    uuid: str
    name: str  # the model, e.g. "NVIDIA H200"
    memory_total: int
    memory_used: int


@dataclasses.dataclass(frozen=True)
class GpuProcess:
    pid: int  # host pid
    uuid: str  # the device it uses
    memory_used: int


@dataclasses.dataclass(frozen=True)
class Inventory:
    driver: str = ""  # e.g. "570.86.10"
    cuda_driver: int = 0  # e.g. 12080
    devices: tuple[Device, ...] = ()
    processes: tuple[GpuProcess, ...] = ()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Inventory:
        return cls(
            driver=str(data.get("driver", "")),
            cuda_driver=int(data.get("cuda_driver", 0)),
            devices=tuple(Device(**d) for d in data.get("devices") or ()),
            processes=tuple(GpuProcess(**p) for p in data.get("processes") or ()),
        )


def node_inventory() -> Inventory | None:
    """This node's GPUs, or None when it has no NVIDIA driver (and no configured inventory)."""
    path = os.environ.get(INVENTORY_ENV, "")
    if path:
        with contextlib.suppress(OSError, ValueError, TypeError):
            with open(path) as f:
                return Inventory.from_dict(json.load(f))
        return None
    return nvml_inventory()


def nvml_inventory() -> Inventory | None:
    try:
        import pynvml  # type: ignore[import-untyped]
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # pynvml.NVMLError and OSError when libnvidia-ml is absent
        return None
    try:
        devices: list[Device] = []
        processes: list[GpuProcess] = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            uuid = _text(pynvml.nvmlDeviceGetUUID(handle))
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            devices.append(Device(uuid, _text(pynvml.nvmlDeviceGetName(handle)), int(memory.total), int(memory.used)))
            for getter in (
                pynvml.nvmlDeviceGetComputeRunningProcesses,
                pynvml.nvmlDeviceGetGraphicsRunningProcesses,
            ):
                with contextlib.suppress(Exception):
                    for p in getter(handle):
                        processes.append(GpuProcess(int(p.pid), uuid, int(p.usedGpuMemory or 0)))
        return Inventory(
            driver=_text(pynvml.nvmlSystemGetDriverVersion()),
            cuda_driver=int(pynvml.nvmlSystemGetCudaDriverVersion()),
            devices=tuple(devices),
            processes=tuple(processes),
        )
    except Exception:
        return None
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
