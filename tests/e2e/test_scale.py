"""Checkpoints that cost what changed: a large container checkpointed periodically and then
stopped, and pods of two identities holding the same data, through the shared chunk store.

The workload is hack/memhog.c: it fills its memory with half-compressible bytes, prints a
counter and a checksum over all of it, and on SIGUSR1 rewrites a share of it (MEMHOG_CHURN).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from hotpods import TIME_SCALE, Incarnation, run_memhog, stored

from testbed import ContainerdInstance, host
from testbed.layout import BIN_DIR

pytestmark = [pytest.mark.e2e]


@pytest.fixture(scope="module")
def inst(containerd: ContainerdInstance) -> ContainerdInstance:
    """The session's containerd alone: these tests are long, and check nothing that differs
    between containerd versions."""
    return containerd


def _manifests(inst: ContainerdInstance, reason: str, pod: str) -> list[dict[str, Any]]:
    found = []
    for ckpt in stored(inst):
        try:
            data = json.loads((ckpt / "manifest.json").read_text())
        except (OSError, ValueError):
            continue  # superseded while read
        if data["reason"] == reason and data["identity"]["pod"] == pod:
            found.append(data)
    return found


def _wait_manifest(inst: ContainerdInstance, reason: str, pod: str, timeout: float) -> dict[str, Any]:
    assert host.wait_until(lambda: bool(_manifests(inst, reason, pod)), timeout), f"no {reason} checkpoint"
    return _manifests(inst, reason, pod)[0]


def _chunk_bytes(inst: ContainerdInstance) -> int:
    base = inst.store / "v1" / "chunks"
    return sum(p.stat().st_size for p in base.rglob("*") if p.is_file()) if base.exists() else 0


def test_a_4gib_container_checkpointed_periodically_then_stopped_writes_what_changed_and_continues(
    client: Any, inst: ContainerdInstance, tmp_path: Path, memhog: Path, empty_store: None
) -> None:
    annotations = {"hotrestart.io/checkpoint-interval": "20s", "hotrestart.io/checkpoint-timeout": "60s"}
    env = {"MEMHOG_CHURN": "10"}
    pod = Incarnation(client, inst, tmp_path, "big-0", annotations=annotations)
    run_memhog(pod, memhog, 4096, env)
    pod.state(timeout=120)
    periodic = _wait_manifest(inst, "periodic", "big-0", 180)
    raw = sum(f["raw_bytes"] for f in periodic["files"])
    assert raw > 4 << 30, "the periodic checkpoint holds all of the memory"
    client.exec_sync(pod.cid, ["kill", "-USR1", "1"])
    assert host.wait_until(lambda: any(x.startswith("rewrote") for x in pod.lines()), 30), pod.lines()
    time.sleep(0.5)  # a row printed after the rewrite
    counter, checksum, _ = pod.state()
    assert pod.stop(grace=60).exit_code == 143
    stop = _wait_manifest(inst, "stop", "big-0", 180)
    stop_raw = sum(f["raw_bytes"] for f in stop["files"])
    # 10% rewritten, half-compressible: about 5% of the raw memory is new; never all of it.
    assert 0.02 * stop_raw < stop["new_bytes"] < 0.15 * stop_raw, (stop["new_bytes"], stop_raw)
    if "whole" not in stop["timings"]:  # a dump of all of the memory: stored while CRIU wrote it
        followed = rf"checkpoint {stop['id']}: ([0-9]+) bytes of pages stored while CRIU wrote them"
        said = re.search(followed, inst.read_log())
        assert said is not None and int(said.group(1)) > 0, "nothing was stored while the stop's dump was written"
    pod.remove()
    again = Incarnation(client, inst, tmp_path, "big-0")
    run_memhog(again, memhog, 4096, env)
    n, same, _ = again.state(timeout=120)
    assert same == checksum and n > counter, (counter, checksum, again.lines()[:5])
    again.remove()


def test_pods_of_two_identities_holding_the_same_data_store_it_once(
    client: Any, inst: ContainerdInstance, tmp_path: Path, memhog: Path, empty_store: None
) -> None:
    env = {"MEMHOG_SEED": "7"}
    grown = []
    for name in ("same-a", "same-b"):
        before = _chunk_bytes(inst)
        pod = Incarnation(client, inst, tmp_path, name)
        run_memhog(pod, memhog, 256, env)
        pod.state(timeout=60)
        assert pod.stop().exit_code == 143
        _wait_manifest(inst, "stop", name, 60)
        grown.append(_chunk_bytes(inst) - before)
        pod.remove()
    second = _manifests(inst, "stop", "same-b")[0]
    assert grown[1] < 0.1 * grown[0], grown
    assert second["new_bytes"] < 0.1 * sum(f["stored_bytes"] for f in second["files"]), second["new_bytes"]
    again = Incarnation(client, inst, tmp_path, "same-b")
    run_memhog(again, memhog, 256, env)
    assert again.first()[0] > 1, "the second identity restores from the shared chunks"
    again.remove()


def _soft_dirty() -> bool:
    return (
        subprocess.run([str(BIN_DIR / "criu"), "check", "--feature", "mem_dirty_track"], capture_output=True).returncode
        == 0
    )


@pytest.mark.skipif(not _soft_dirty(), reason="the kernel tracks no soft-dirty pages (the node VM's does)")
def test_with_soft_dirty_pages_a_stop_after_a_periodic_checkpoint_dumps_only_what_changed(
    client: Any, inst: ContainerdInstance, tmp_path: Path, memhog: Path, empty_store: None
) -> None:
    mib = 128
    # Long enough that the stop comes before the next periodic dump: a stop while one is
    # being published has no parent (that dump ended the chain) and dumps everything.
    annotations = {"hotrestart.io/checkpoint-interval": f"{round(15 * TIME_SCALE)}s"}
    env = {"MEMHOG_CHURN": "10"}
    pod = Incarnation(client, inst, tmp_path, "tracked-0", annotations=annotations)
    run_memhog(pod, memhog, mib, env)
    pod.state(timeout=60)
    periodic = _wait_manifest(inst, "periodic", "tracked-0", 40 * TIME_SCALE)
    client.exec_sync(pod.cid, ["kill", "-USR1", "1"])
    assert host.wait_until(lambda: any(x.startswith("rewrote") for x in pod.lines()), 30), pod.lines()
    time.sleep(0.5)  # a row printed after the rewrite
    counter, checksum, _ = pod.state()
    assert pod.stop().exit_code == 143
    stop = _wait_manifest(inst, "stop", "tracked-0", 40 * TIME_SCALE)
    # CRIU wrote the rewritten pages (and what the periodic dumps since touched); the rest
    # was taken from the newest periodic checkpoint before the stop's was stored.
    log = inst.read_log()
    assert "holds what changed since" in log, inst.log_tail()
    taken = [
        int(n)
        for cid, n in re.findall(r"checkpoint ([\w-]+): (\d+) bytes of pages taken from", log)
        if cid == stop["id"]
    ]
    assert taken and taken[0] > 0.5 * (mib << 20), (taken, inst.log_tail())
    assert "whole" in stop["timings"] and periodic["id"] != stop["id"]
    pod.remove()
    again = Incarnation(client, inst, tmp_path, "tracked-0")
    run_memhog(again, memhog, mib, env)
    n, same, _ = again.state(timeout=60)
    assert same == checksum and n > counter, (counter, checksum, again.lines()[:5])
    again.remove()
