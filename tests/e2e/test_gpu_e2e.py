"""GPU state through checkpoints, end to end, with a stand-in cuda-checkpoint (no GPU here).

The workload maps a file named libcuda.so.1 (busybox copied under that name and run as sh),
which is how the shim finds GPU processes without NVML. The stand-in keeps each process's
CUDA state inside the process's root filesystem, refuses what the real tool refuses (wrong
state, frozen process) and logs every call, so the tests check the calls, their order
around the dump and the restore, the pids used, and the cleanup after injected failures.
"""

from __future__ import annotations

import datetime
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hotpods import Incarnation, stored, wait_published

from cri import CONTAINER_RUNNING, CRIClient
from testbed import ContainerdInstance, host

pytestmark = pytest.mark.e2e

STANDIN = Path(__file__).resolve().parent / "standin" / "cuda-checkpoint"
GPU_APP = [
    "sh",
    "-c",
    "cp /bin/busybox /tmp/libcuda.so.1 && exec -a sh /tmp/libcuda.so.1 -c "
    "'trap \"exit 143\" TERM; s=$RANDOM$RANDOM; i=0; while :; do i=$((i+1)); echo $i $s $s; sleep 0.1; done'",
]


class Standin:
    def __init__(self, base: Path) -> None:
        self.log = base / "calls.jsonl"
        self.fail = base / "fail"
        self.inventory = base / "inventory.json"

    def reset(self) -> None:
        for f in (self.log, self.fail, self.inventory):
            f.unlink(missing_ok=True)

    def calls(self, *, state_queries: bool = False) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        calls = [json.loads(line) for line in self.log.read_text().splitlines()]
        return [c for c in calls if state_queries or c["call"] != "get-state"]

    def summary(self, *pids: int) -> list[tuple[str, int, bool]]:
        """Calls for `pids` (the workload's `sleep` children are short-lived CUDA processes too:
        busybox runs applets in a forked copy of itself, which maps libcuda.so.1)."""
        return [(c["call"], c["pid"], c["ok"]) for c in self.calls() if c["pid"] in pids]


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Standin:
    return Standin(tmp_path_factory.mktemp("standin"))


@pytest.fixture(scope="module")
def inst(containerd_factory: Callable[..., ContainerdInstance], standin: Standin) -> ContainerdInstance:
    env = {
        "HOTRESTART_CUDA_CHECKPOINT": str(STANDIN),
        "CUDA_STANDIN_LOG": str(standin.log),
        "CUDA_STANDIN_FAIL": str(standin.fail),
        "HOTRESTART_GPU_INVENTORY": str(standin.inventory),
    }
    return containerd_factory("2", env=env)


@pytest.fixture(autouse=True)
def clean(empty_store: None, standin: Standin) -> None:
    standin.reset()


def shim_log_time(inst: ContainerdInstance, pattern: str) -> float:
    """When the shim logged a line matching `pattern` (its log times are UTC)."""
    for line in inst.read_log().splitlines():
        m = re.match(r"time=(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*" + pattern, line)
        if m:
            stamp = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
            return stamp.replace(tzinfo=datetime.UTC).timestamp()
    raise AssertionError(f"no shim log line matches {pattern!r}")


def test_hot_restart_carries_gpu_state(client: CRIClient, inst: ContainerdInstance, standin: Standin) -> None:
    tmp = inst.dir / "gpu-hot"
    pod = Incarnation(client, inst, tmp, "gpu-0")
    pod.create(GPU_APP)
    n, s, _ = pod.state()
    pid = client.container_pid(pod.cid)
    assert pod.stop().exit_code == 143
    wait_published(inst)
    assert standin.summary(pid) == [("lock", pid, True), ("checkpoint", pid, True)]
    dump = shim_log_time(inst, rf"{pod.cid}: dump \S+ \(stop\) begins")
    assert max(c["time"] for c in standin.calls()) < dump, "GPU state is checkpointed before CRIU dumps"
    [ckpt] = stored(inst)
    assert json.loads((ckpt / "manifest.json").read_text())["gpu"]["owner"] == "shim"
    pod.remove()

    again = Incarnation(client, inst, tmp, "gpu-0")
    again.create(GPU_APP)
    first = again.first()
    assert first[1] == s and first[0] > n, (first, n)
    new_pid = client.container_pid(again.cid)
    [toggle] = [c for c in standin.calls() if c["pid"] == new_pid]
    assert (toggle["call"], toggle["from"], toggle["ok"]) == ("toggle", "checkpointed", True), "restore + unlock"
    # new_pid exists only once runc restore has run: the toggle came after the restore.
    again.remove()


def test_periodic_checkpoint_leaves_gpu_processes_running(
    client: CRIClient, inst: ContainerdInstance, standin: Standin
) -> None:
    pod = Incarnation(
        client, inst, inst.dir / "gpu-per", "gpu-1", annotations={"hotrestart.io/checkpoint-interval": "2s"}
    )
    pod.create(GPU_APP)
    pid = client.container_pid(pod.cid)
    wait_published(inst, timeout=20)
    assert standin.summary(pid)[:3] == [("lock", pid, True), ("checkpoint", pid, True), ("toggle", pid, True)]
    n = pod.state()[0]
    assert host.wait_until(lambda: pod.counter() > n + 3, 10), "still running, and running on the GPU"
    nspid = next(c["nspid"] for c in standin.calls() if c["pid"] == pid)
    assert (Path(f"/proc/{pid}/root/tmp") / f".cuda-standin-{nspid}").read_text().strip() in (
        "running",
        "locked",  # the next periodic checkpoint may be under way
    )
    pod.remove()


def test_cri_checkpoint_of_a_paused_gpu_container(
    client: CRIClient, inst: ContainerdInstance, standin: Standin
) -> None:
    # containerd pauses the task around Task.Checkpoint; the stand-in refuses a frozen process.
    pod = Incarnation(client, inst, inst.dir / "gpu-cri", "gpu-2")
    pod.create(GPU_APP)
    pid = client.container_pid(pod.cid)
    client.checkpoint_container(pod.cid, str(inst.dir / "gpu-2.tar"))
    assert standin.summary(pid) == [("lock", pid, True), ("checkpoint", pid, True), ("toggle", pid, True)]
    assert client.container_status(pod.cid).state == CONTAINER_RUNNING
    n = pod.state()[0]
    assert host.wait_until(lambda: pod.counter() > n + 3, 10)
    pod.remove()


@pytest.mark.parametrize("step", ["lock", "checkpoint"])
def test_a_failure_part_way_stops_the_ordinary_way(
    client: CRIClient, inst: ContainerdInstance, standin: Standin, step: str
) -> None:
    standin.fail.write_text(f"{step}:1\n")  # the container's init
    pod = Incarnation(client, inst, inst.dir / f"gpu-fail-{step}", f"gpu-f{step}")
    pod.create(GPU_APP)
    pid = client.container_pid(pod.cid)
    pod.state()
    assert pod.stop().exit_code == 143
    expected = [("lock", pid, False)] if step == "lock" else [("lock", pid, True), ("checkpoint", pid, False)]
    if step == "checkpoint":
        expected.append(("unlock", pid, True))  # rolled back before the signal was delivered
    assert standin.summary(pid) == expected
    assert "delivering signal 15 the ordinary way" in inst.read_log()
    time.sleep(0.5)
    assert not stored(inst) and not stored(inst, "staging"), "no partial checkpoint is published"
    pod.remove()


def test_a_failed_gpu_restore_starts_cold(client: CRIClient, inst: ContainerdInstance, standin: Standin) -> None:
    tmp = inst.dir / "gpu-rfail"
    pod = Incarnation(client, inst, tmp, "gpu-3")
    pod.create(GPU_APP)
    pod.state()
    assert pod.stop().exit_code == 143
    wait_published(inst)
    pod.remove()
    standin.fail.write_text("toggle:1\n")
    again = Incarnation(client, inst, tmp, "gpu-3")
    again.create(GPU_APP)
    again.state()
    assert host.wait_until(lambda: any("started cold" in line for line in again.lines()), 10), again.lines()
    lines = again.lines()
    # The restored process ran a moment before its GPU state failed to come back: its lines
    # come first, then the note, then the cold start counting from 1.
    note = next(i for i, line in enumerate(lines) if "started cold" in line)
    assert "injected failure of toggle" in lines[note], lines[note]
    assert host.wait_until(lambda: len(again.lines()) > note + 1, 10)
    assert again.lines()[note + 1].split()[0] == "1", again.lines()
    assert len(stored(inst, "quarantine")) == 1
    again.remove()


def test_a_node_with_other_gpus_starts_cold(client: CRIClient, inst: ContainerdInstance, standin: Standin) -> None:
    tmp = inst.dir / "gpu-compat"
    pod = Incarnation(client, inst, tmp, "gpu-4")
    pod.create(GPU_APP)
    pid = client.container_pid(pod.cid)
    device = {"uuid": "GPU-1111", "name": "NVIDIA H200", "memory_total": 150 << 30, "memory_used": 2 << 30}
    process = {"pid": pid, "uuid": "GPU-1111", "memory_used": 2 << 30}
    standin.inventory.write_text(json.dumps({"driver": "570.86.10", "devices": [device], "processes": [process]}))
    pod.state()
    assert pod.stop().exit_code == 143
    [ckpt] = wait_published(inst)
    gpu = json.loads((ckpt / "manifest.json").read_text())["gpu"]
    assert (gpu["count"], gpu["devices"][0]["name"], gpu["processes"][0]["memory_used"]) == (1, "NVIDIA H200", 2 << 30)
    pod.remove()
    other = dict(device, uuid="GPU-2222", name="NVIDIA A100-SXM4-80GB")
    standin.inventory.write_text(json.dumps({"driver": "570.86.10", "devices": [other], "processes": []}))
    again = Incarnation(client, inst, tmp, "gpu-4")
    again.create(GPU_APP)
    assert again.first()[0] == 1
    assert any("not compatible" in line and "GPUs differ" in line for line in again.lines()), again.lines()
    again.remove()
