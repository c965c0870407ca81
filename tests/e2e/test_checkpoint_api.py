"""Checkpoints while running, end to end: CRI CheckpointContainer (what `crictl checkpoint`
and the kubelet's checkpoint API call), `ctr task checkpoint`, and periodic checkpoints with
recovery after a crash.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import grpc
import pytest
from hotpods import TIME_SCALE, Incarnation, stored, wait_published

from cri import CONTAINER_RUNNING, CRIClient
from testbed import BIN_DIR, ContainerdInstance, host

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("empty_store")]


def manifest(ckpt: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((ckpt / "manifest.json").read_text())
    return data


def crit(*args: str) -> str:
    return subprocess.run([str(BIN_DIR / "crit"), *args], capture_output=True, text=True, check=True).stdout


def counting(pod: Incarnation, at_least: int = 3) -> tuple[int, int, int]:
    assert host.wait_until(lambda: pod.counter() >= at_least, 20), pod.lines()[-3:]
    return pod.state()


def test_cri_checkpoint_gives_an_archive_and_a_restore_point(
    client: CRIClient, inst: ContainerdInstance, tmp_path: Path
) -> None:
    pod = Incarnation(client, inst, tmp_path, "api-0")
    pod.create()
    before, checksum, _ = counting(pod)
    archive = tmp_path / "api-0.tar"
    if inst.is_1_7:
        with pytest.raises(grpc.RpcError) as err:
            client.checkpoint_container(pod.cid, str(archive))
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED  # containerd 1.7's CRI has no checkpoint
        pod.remove()
        return
    client.checkpoint_container(pod.cid, str(archive))
    after = pod.state()[0]
    assert client.container_status(pod.cid).state == CONTAINER_RUNNING
    assert host.wait_until(lambda: pod.counter() > after + 2, 10), "the container keeps running and counting"
    assert pod.state()[1:] == (checksum, checksum)

    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
        assert {"config.dump", "spec.dump", "rootfs-diff.tar", "checkpoint/inventory.img"} <= names, sorted(names)
        # CRIU's own records, where containerd looks for them (2.0-2.1.8 require stats-dump).
        assert {"stats-dump", "dump.log"} <= names, sorted(names)
        assert any(re.fullmatch(r"checkpoint/pages-\d+\.img", n) for n in names), sorted(names)
        tar.extractall(tmp_path / "unpacked", filter="data")
    images = tmp_path / "unpacked" / "checkpoint"
    assert json.loads(crit("show", str(images / "inventory.img")))["magic"] == "INVENTORY"
    assert "awk" in crit("x", str(images), "ps"), "CRIU's own crit reads the images"

    # The API checkpoint is also the pod's newest restore point: after a plain kill (no
    # stop-time checkpoint), the next incarnation continues from the checkpoint's count.
    [ckpt] = wait_published(inst)
    assert manifest(ckpt)["reason"] == "api"
    pod.stop(grace=0)
    pod.remove()
    again = Incarnation(client, inst, tmp_path, "api-0")
    again.create()
    first = again.first()
    assert before < first[0] <= after + 1 and first[1] == checksum, (before, first, after)
    again.remove()


def test_ctr_task_checkpoint(client: CRIClient, inst: ContainerdInstance, tmp_path: Path) -> None:
    pod = Incarnation(client, inst, tmp_path, "ctr-0")
    pod.create()
    n, checksum, _ = counting(pod)
    ref = inst.ctr("tasks", "checkpoint", pod.cid).stdout.strip()
    assert ref.startswith("containerd.io/checkpoint/"), ref
    assert ref in inst.ctr("images", "ls", "-q").stdout.split()
    assert host.wait_until(lambda: pod.counter() > n + 3, 10), "the task keeps running"
    assert pod.state()[1:] == (checksum, checksum)
    [ckpt] = wait_published(inst)
    assert manifest(ckpt)["reason"] == "api"
    inst.ctr("images", "rm", ref)
    pod.remove()


def test_periodic_checkpoint_restores_after_a_crash(
    client: CRIClient, inst: ContainerdInstance, tmp_path: Path
) -> None:
    pod = Incarnation(client, inst, tmp_path, "cron-0", annotations={"hotrestart.io/checkpoint-interval": "2s"})
    pod.create()
    _, checksum, _ = pod.state()
    [ckpt] = wait_published(inst, timeout=30)
    assert manifest(ckpt)["reason"] == "periodic"
    n = pod.state()[0]
    assert host.wait_until(lambda: pod.counter() > n + 3, 10), "checkpoints leave it running"
    os.kill(client.container_pid(pod.cid), signal.SIGKILL)  # as a crash would
    assert client.wait_container_exit(pod.cid).exit_code == 137
    crashed_at = pod.state()[0]
    pod.create(attempt=1)  # the kubelet restarts the container in the same pod
    first = pod.first()
    assert 1 < first[0] <= crashed_at + 1 and first[1] == checksum, (first, crashed_at)
    assert any(line.startswith("hotrestart: restoring from checkpoint") for line in pod.lines())
    pod.remove()


def test_periodic_checkpoint_restores_after_an_oom_kill(
    client: CRIClient, inst: ContainerdInstance, tmp_path: Path
) -> None:
    # SIGUSR1 makes the workload's init exec a 256 MiB allocation under a 64 MiB limit. A
    # periodic dump can interrupt dd's read part-way, which dd would take as its whole block
    # and exit 0: fullblock reads on until the block is full.
    oomable = [
        "sh",
        "-c",
        "trap 'exec dd if=/dev/zero of=/dev/null bs=256M count=1 iflag=fullblock' USR1; s=$RANDOM$RANDOM; i=0; "
        "while :; do i=$((i+1)); echo $i $s $s; sleep 0.1; done",
    ]
    # A dump that runs between the signal and the kill keeps the signal pending in its images,
    # and a restore of it is killed again, faithfully. The signal goes right after a
    # checkpoint is published: the next dump begins a whole interval after the last one ended.
    interval = round(5 * TIME_SCALE)
    pod = Incarnation(
        client, inst, tmp_path, "oom-0", annotations={"hotrestart.io/checkpoint-interval": f"{interval}s"}
    )
    pod.create(oomable, memory_limit=64 << 20)
    _, checksum, _ = pod.state()
    wait_published(inst, timeout=30 + interval)
    dumps = len(re.findall(rf"{pod.cid}: dump \S+ \(periodic\) begins", inst.read_log()))
    os.kill(client.container_pid(pod.cid), signal.SIGUSR1)
    st = client.wait_container_exit(pod.cid, timeout=30 * TIME_SCALE)
    assert (st.exit_code, st.reason) == (137, "OOMKilled")
    later = len(re.findall(rf"{pod.cid}: dump \S+ \(periodic\) begins", inst.read_log()))
    assert later == dumps, "a periodic dump began between the signal and the kill"
    killed_at = pod.state()[0]
    pod.create(oomable, attempt=1, memory_limit=64 << 20)
    first = pod.first()
    assert 1 < first[0] <= killed_at + 1 and first[1] == checksum, (first, killed_at)
    pod.remove()


def test_clean_exit_retires_periodic_checkpoints(client: CRIClient, inst: ContainerdInstance, tmp_path: Path) -> None:
    pod = Incarnation(client, inst, tmp_path, "job-0", annotations={"hotrestart.io/checkpoint-interval": "1s"})
    # Under emulation a dump takes longer than the job's 4 s of work: it works for longer.
    steps = round(40 * TIME_SCALE)
    pod.create(["sh", "-c", f"i=0; while [ $i -lt {steps} ]; do i=$((i+1)); echo $i 1 1; sleep 0.1; done"])
    wait_published(inst, timeout=20)
    assert client.wait_container_exit(pod.cid, timeout=30 * TIME_SCALE).exit_code == 0
    assert host.wait_until(lambda: not stored(inst), 10), "a finished job leaves no restore point"
    pod.remove()


def test_overlapping_triggers_are_serialised(client: CRIClient, inst: ContainerdInstance, tmp_path: Path) -> None:
    pod = Incarnation(client, inst, tmp_path, "busy-0", annotations={"hotrestart.io/checkpoint-interval": "1s"})
    pod.create()
    counting(pod)
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:  # API checkpoints racing the periodic ones
        done = inst.ctr("tasks", "checkpoint", pod.cid, check=False)
        if done.returncode != 0:
            # containerd 1.7's client refuses to ingest a blob (the unchanged rootfs diff)
            # identical to one just written; the shim's part succeeded.
            assert "already exists" in done.stderr, done.stderr
            continue
        inst.ctr("images", "rm", done.stdout.strip())  # names are per second: make room for the next
    log = inst.read_log()
    events = re.findall(rf"{pod.cid}: dump \S+ \((\w+)\) (begins|ends)", log)
    reasons = {r for r, _ in events}
    assert {"api", "periodic"} <= reasons, events
    for i, (_, what) in enumerate(events):
        assert what == ("begins" if i % 2 == 0 else "ends"), f"two dumps overlapped: {events}"
    assert "periodic checkpoint failed" not in log
    pod.remove()
