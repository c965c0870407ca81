"""A container larger than the node's memory budget for checkpoint images still checkpoints
and restores: its images go to the work folder on disk, not to a tmpfs.

The budget is HOTRESTART_WORK_MEMORY; a budget far below the container stands in for a node
whose free memory is smaller than the container (filling most of this machine's memory
would take minutes and tell nothing more).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hotpods import Incarnation, run_memhog, wait_published

from testbed import ContainerdInstance

pytestmark = [pytest.mark.e2e]


@pytest.fixture(scope="module")
def disk_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("disk-work")


@pytest.fixture(scope="module")
def inst(containerd_factory: Callable[..., ContainerdInstance], disk_work: Path) -> ContainerdInstance:
    return containerd_factory("2", env={"HOTRESTART_WORK_MEMORY": "64M", "HOTRESTART_WORK_DIR": str(disk_work)})


def _mounts() -> str:
    return Path("/proc/self/mountinfo").read_text()


def test_a_container_over_the_memory_budget_checkpoints_and_restores_through_disk(
    client: Any, inst: ContainerdInstance, tmp_path: Path, memhog: Path, disk_work: Path, empty_store: None
) -> None:
    pod = Incarnation(client, inst, tmp_path, "over-budget-0")
    run_memhog(pod, memhog, 512)
    pod.state(timeout=60)
    counter, checksum, _ = pod.state()
    # A kubelet's default grace (30 s), longer than the dump's own budget (the pod's
    # checkpoint-timeout), so containerd's SIGKILL cannot cut a dump through the disk that is
    # still within it.
    assert pod.stop(grace=30).exit_code == 143
    wait_published(inst)
    pod.remove()
    again = Incarnation(client, inst, tmp_path, "over-budget-0")
    run_memhog(again, memhog, 512)
    n, same, _ = again.state(timeout=60)
    assert same == checksum and n > counter, (counter, checksum, again.lines()[:5])
    log = inst.read_log()
    on_disk = [line for line in log.splitlines() if "on disk" in line and str(disk_work) in line]
    assert any("restore-" in line for line in on_disk), "the restore's images were on disk"
    assert any("restore-" not in line for line in on_disk), "the dump's images were on disk"
    assert "/run/hotrestart/work/" not in _mounts()
    again.remove()
    assert list(disk_work.iterdir()) == [], "work folders are removed after use"
