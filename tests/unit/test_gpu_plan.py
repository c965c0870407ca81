"""GPU decisions at the project's own seams: a fake NVML inventory and a fake cuda-checkpoint."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from hotrestart.errors import CheckpointError
from hotrestart.gpu import plan
from hotrestart.gpu.inventory import Device, GpuProcess, Inventory
from hotrestart.gpu.state import GpuState, Suspension
from hotrestart.runtime.cuda_checkpoint import CudaCheckpoint

GIB = 1 << 30
H200 = "NVIDIA H200"


def inventory(
    *devices: tuple[str, str, int], processes: tuple[GpuProcess, ...] = (), driver: str = "570.86.10"
) -> Inventory:
    return Inventory(
        driver=driver,
        cuda_driver=12080,
        devices=tuple(Device(uuid, name, 141 * GIB, used) for uuid, name, used in devices),
        processes=processes,
    )


def recorded(*devices: tuple[str, str, int], driver: str = "570.86.10") -> dict[str, Any]:
    uuids = [u for u, _, _ in devices]
    inv = inventory(*devices, processes=tuple(GpuProcess(100, u, used) for u, _, used in devices), driver=driver)
    rec = plan.record([100], inv, "shim")
    assert rec["count"] == len(uuids)
    return rec


def test_gpu_processes_come_from_nvml_and_from_libcuda_maps() -> None:
    inv = inventory(("GPU-a", H200, 0), processes=(GpuProcess(4242, "GPU-a", GIB),))
    # 4242 is not in the container; our own process maps no libcuda.
    assert plan.gpu_pids([os.getpid()], inv) == []
    assert plan.gpu_pids([1, 7], None) == [1], "without NVML: the processes that map libcuda.so"
    assert plan.gpu_pids([4242, os.getpid()], inv) == [4242]
    assert plan.device_memory_in_use([4242], inv) == GIB


def test_host_memory_must_hold_the_device_memory() -> None:
    assert plan.host_memory_problem(0, 0) == ""
    assert plan.host_memory_problem(8 * GIB, 64 * GIB) == ""
    assert "staging" not in plan.host_memory_problem(80 * GIB, 64 * GIB)
    assert "available to stage it" in plan.host_memory_problem(80 * GIB, 64 * GIB)


def test_placement_same_node_same_gpus() -> None:
    rec = recorded(("GPU-a", H200, 40 * GIB))
    assert plan.placement(rec, inventory(("GPU-a", H200, 0))) == ({}, "")


def test_placement_maps_other_gpus_of_the_same_model() -> None:
    rec = recorded(("GPU-a", H200, 40 * GIB), ("GPU-b", H200, 40 * GIB))
    mapping, why = plan.placement(rec, inventory(("GPU-x", H200, 0), ("GPU-b", H200, 0)))
    assert why == "" and mapping == {"GPU-a": "GPU-x"}


@pytest.mark.parametrize(
    "here, words",
    [
        (None, "no NVIDIA driver"),
        (inventory(("GPU-a", "NVIDIA A100", 0)), "GPUs differ"),
        (inventory(("GPU-a", H200, 0), driver="550.54.15"), "older than"),
        (inventory(("GPU-a", H200, 120 * GIB)), "free"),
    ],
)
def test_placement_refusals(here: Inventory | None, words: str) -> None:
    _, why = plan.placement(recorded(("GPU-a", H200, 40 * GIB)), here)
    assert words in why


def test_placement_refuses_fewer_gpus() -> None:
    rec = recorded(("GPU-a", H200, GIB), ("GPU-b", H200, GIB))
    assert "GPUs differ" in plan.placement(rec, inventory(("GPU-a", H200, 0)))[1]


def test_cuda_checkpoint_command_lines() -> None:
    tool = CudaCheckpoint(None, "/usr/bin/cuda-checkpoint")  # type: ignore[arg-type]
    assert tool.state_argv(7) == ["/usr/bin/cuda-checkpoint", "--get-state", "--pid", "7"]
    assert tool.action_argv("lock", 7, timeout_ms=5000)[-2:] == ["--timeout", "5000"]
    assert tool.action_argv("restore", 7, device_map={"GPU-b": "GPU-y", "GPU-a": "GPU-x"})[-2:] == [
        "--device-map",
        "GPU-a=GPU-x,GPU-b=GPU-y",
    ]
    assert tool.toggle_argv(7) == ["/usr/bin/cuda-checkpoint", "--toggle", "--pid", "7"]


class FakeTool:
    """Per-pid state machine of cuda-checkpoint, with failures to inject."""

    def __init__(self, pids: list[int], fail: frozenset[tuple[str, int]] = frozenset()) -> None:
        self.states = dict.fromkeys(pids, "running")
        self.fail = set(fail)
        self.calls: list[tuple[str, int]] = []

    async def state(self, pid: int) -> str:
        return self.states[pid]

    async def action(self, action: str, pid: int, *, timeout_ms: int = 0, device_map: Mapping[str, str] = {}) -> None:
        self.calls.append((action, pid))
        if (action, pid) in self.fail:
            raise CheckpointError(f"{action} {pid}: injected")
        want, to = {
            "lock": ("running", "locked"),
            "checkpoint": ("locked", "checkpointed"),
            "restore": ("checkpointed", "locked"),
            "unlock": ("locked", "running"),
        }[action]
        assert self.states[pid] == want, (action, pid, self.states[pid])
        self.states[pid] = to

    async def toggle(self, pid: int) -> None:
        self.calls.append(("toggle", pid))
        if ("toggle", pid) in self.fail:
            raise CheckpointError(f"toggle {pid}: injected")
        self.states[pid] = {"running": "checkpointed", "checkpointed": "running"}[self.states[pid]]


@pytest.fixture(autouse=True)
def cuda_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake pids all "map libcuda.so" (a vanished process would not)."""
    monkeypatch.setattr(plan, "maps_libcuda", lambda pid: pid in (1, 2))


def gpu_state(tool: FakeTool) -> GpuState:
    return GpuState(None, tool=tool, inventory=lambda: None)  # type: ignore[arg-type]


async def test_suspend_then_resume() -> None:
    tool = FakeTool([1, 2])
    gpu = gpu_state(tool)
    s = Suspension([1, 2], "shim", {})
    await gpu.suspend(s)
    assert tool.states == {1: "checkpointed", 2: "checkpointed"}
    assert [c for c, _ in tool.calls] == ["lock", "lock", "checkpoint", "checkpoint"], (
        "all locked before any checkpoint"
    )
    await gpu.resume(s)
    assert tool.states == {1: "running", 2: "running"} and tool.calls[-1][0] == "toggle"
    await gpu.resume(s, {"GPU-a": "GPU-b"})  # already running: nothing to do
    assert tool.states == {1: "running", 2: "running"}


@pytest.mark.parametrize("step", [("lock", 2), ("checkpoint", 2), ("checkpoint", 1)])
async def test_a_failure_part_way_leaves_every_process_running(step: tuple[str, int]) -> None:
    tool = FakeTool([1, 2], fail=frozenset({step}))
    with pytest.raises(CheckpointError, match="injected"):
        await gpu_state(tool).suspend(Suspension([1, 2], "shim", {}))
    assert tool.states == {1: "running", 2: "running"}


async def test_restore_with_a_device_map_restores_then_unlocks() -> None:
    tool = FakeTool([1])
    tool.states[1] = "checkpointed"
    await gpu_state(tool).resume(Suspension([1], "shim", {}), {"GPU-a": "GPU-x"})
    assert tool.calls == [("restore", 1), ("unlock", 1)] and tool.states[1] == "running"


async def test_a_process_gone_meanwhile_is_not_a_failure() -> None:
    tool = FakeTool([1, 3], fail=frozenset({("lock", 3)}))  # 3 exited: it maps no libcuda.so
    s = Suspension([1, 3], "shim", {})
    await gpu_state(tool).suspend(s)
    assert s.pids == [1] and tool.states[1] == "checkpointed"


async def test_a_restored_process_gone_before_its_resume_is_not_a_failure() -> None:
    # 3, a restored short-lived child, exited before its toggle (it maps no libcuda.so now).
    tool = FakeTool([1, 3], fail=frozenset({("toggle", 3)}))
    tool.states.update({1: "checkpointed", 3: "checkpointed"})
    await gpu_state(tool).resume(Suspension([1, 3], "shim", {}))
    assert tool.states[1] == "running"
    # One still there that cannot be resumed fails the restore.
    tool = FakeTool([1, 2], fail=frozenset({("toggle", 2)}))
    tool.states.update({1: "checkpointed", 2: "checkpointed"})
    with pytest.raises(CheckpointError, match="injected"):
        await gpu_state(tool).resume(Suspension([1, 2], "shim", {}))


async def test_the_criu_plugin_owns_gpu_state_where_loaded() -> None:
    tool = FakeTool([1])
    await gpu_state(tool).suspend(Suspension([1], "criu-plugin", {}))
    assert tool.calls == []


def test_doctor_reports_the_gpu_situation(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from hotrestart.cli import gpu_checks

    standin = Path(__file__).resolve().parents[1] / "e2e" / "standin" / "cuda-checkpoint"
    inv = {"driver": "570.86.10", "devices": [{"uuid": "GPU-a", "name": H200, "memory_total": 1, "memory_used": 0}]}
    (tmp_path / "inv.json").write_text(json.dumps(inv))
    monkeypatch.setenv("HOTRESTART_GPU_INVENTORY", str(tmp_path / "inv.json"))
    monkeypatch.setenv("HOTRESTART_CUDA_CHECKPOINT", str(standin))
    monkeypatch.setattr(plan, "find_cuda_plugin", lambda criu: "")  # whatever this host has installed
    checks = {c.name: c for c in gpu_checks()}
    assert checks["nvidia driver"].ok and "1 GPU(s): NVIDIA H200" in checks["nvidia driver"].detail
    assert checks["cuda-checkpoint"].ok and checks["cuda-checkpoint"].fix == ""
    assert checks["GPU state owner"].ok and checks["GPU state owner"].detail == "the shim, through cuda-checkpoint"
    monkeypatch.setenv("HOTRESTART_CUDA_CHECKPOINT", str(tmp_path / "absent"))
    checks = {c.name: c for c in gpu_checks()}
    missing = checks["cuda-checkpoint"]
    assert not missing.ok and missing.detail.startswith("not found")
    assert missing.fix == "install NVIDIA's cuda-checkpoint on PATH"
    owner = checks["GPU state owner"]
    assert not owner.ok and owner.detail.startswith("nobody"), "a GPU node with no way to save GPU state"
