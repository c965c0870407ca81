"""Deployments and Jobs come back warm with no annotation: the identity comes from the pod's
labels (set exactly as a kubelet sets them), read by the shim from containerd's own API."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from hotpods import STATEFUL, Incarnation, stored, wait_published

from cri import CRIClient, parse_cri_log
from testbed import ContainerdInstance, host

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("empty_store")]

TEMPLATE = {"app": "web", "pod-template-hash": "7d4b9c8f6d"}


def _job(uid: str, index: int | None = None) -> dict[str, str]:
    labels = {
        "batch.kubernetes.io/job-name": "train",
        "batch.kubernetes.io/controller-uid": uid,
        "job-name": "train",
        "controller-uid": uid,
    }
    if index is not None:
        labels["batch.kubernetes.io/job-completion-index"] = str(index)
    return labels


def _suffix() -> str:
    return uuid.uuid4().hex[:5]


def _run_and_stop(pods: list[Incarnation]) -> list[tuple[int, int]]:
    """Run each pod's workload a moment, stop them as a drain would, remove them. The
    workload seeds its random numbers with the second it starts in: one second apart, each
    replica has a state of its own."""
    for i, pod in enumerate(pods):
        if i:
            time.sleep(1.05)
        pod.create()
    time.sleep(1.0)
    states = []
    for pod in pods:
        assert pod.stop().exit_code == 143
        counter, checksum, now = pod.state()
        assert checksum == now and counter >= 3
        states.append((counter, checksum))
        pod.remove()
    return states


def _continued(pod: Incarnation) -> tuple[int, int]:
    """(counter, checksum) of the first line after a restore; asserts it was one."""
    time.sleep(0.5)
    counter, checksum, _ = pod.first()
    notes = [line for line in pod.lines() if line.startswith("hotrestart:")]
    assert counter > 1 and notes and notes[0].startswith("hotrestart: restoring from checkpoint"), pod.lines()
    return counter, checksum


def test_three_replicas_of_a_deployment_come_back_with_three_states(
    client: CRIClient, inst: ContainerdInstance, tmp_path: Path
) -> None:
    old = [Incarnation(client, inst, tmp_path, f"web-7d4b9c8f6d-{_suffix()}", labels=TEMPLATE) for _ in range(3)]
    before = _run_and_stop(old)
    assert len(wait_published(inst, 3)) == 3, "one checkpoint per replica"
    new = [Incarnation(client, inst, tmp_path, f"web-7d4b9c8f6d-{_suffix()}", labels=TEMPLATE) for _ in range(3)]
    for pod in new:
        pod.create()
    after = [_continued(pod) for pod in new]
    by_checksum = dict((s, c) for c, s in before)
    assert sorted(s for _, s in after) == sorted(by_checksum), "three distinct states, each restored once"
    assert all(counter == by_checksum[s] + 1 for counter, s in after), (before, after)
    assert "pod template 7d4b9c8f6d" in new[0].lines()[0]
    assert not stored(inst)
    for pod in new:
        pod.remove()


def test_a_new_pod_template_starts_cold(client: CRIClient, inst: ContainerdInstance, tmp_path: Path) -> None:
    _run_and_stop([Incarnation(client, inst, tmp_path, f"web-7d4b9c8f6d-{_suffix()}", labels=TEMPLATE)])
    wait_published(inst)
    rolled = Incarnation(
        client, inst, tmp_path, f"web-5f6a7b8c9d-{_suffix()}", labels={**TEMPLATE, "pod-template-hash": "5f6a7b8c9d"}
    )
    rolled.create()
    time.sleep(0.5)
    assert rolled.first()[0] == 1, "a changed template is a different workload"
    assert len(stored(inst)) == 1, "the old template's checkpoint is left for its own replicas"
    rolled.remove()


def test_a_job_pod_recreated_under_a_new_name_continues(
    client: CRIClient, inst: ContainerdInstance, tmp_path: Path
) -> None:
    uid = str(uuid.uuid4())
    [(counter, checksum)] = _run_and_stop([Incarnation(client, inst, tmp_path, f"train-{_suffix()}", labels=_job(uid))])
    wait_published(inst)
    again = Incarnation(client, inst, tmp_path, f"train-{_suffix()}", labels=_job(uid))
    again.create()
    assert _continued(again) == (counter + 1, checksum)
    again.remove()


def test_each_index_of_an_indexed_job_gets_its_own(client: CRIClient, inst: ContainerdInstance, tmp_path: Path) -> None:
    uid = str(uuid.uuid4())
    old = [Incarnation(client, inst, tmp_path, f"train-{i}-{_suffix()}", labels=_job(uid, i)) for i in (0, 1)]
    before = _run_and_stop(old)
    wait_published(inst, 2)
    # The indexes come back in the other order: each still finds its own.
    new = [Incarnation(client, inst, tmp_path, f"train-{i}-{_suffix()}", labels=_job(uid, i)) for i in (1, 0)]
    for pod in new:
        pod.create()
    after = [_continued(pod) for pod in new]
    assert after == [(before[1][0] + 1, before[1][1]), (before[0][0] + 1, before[0][1])]
    for pod in new:
        pod.remove()


def test_a_pool_shared_by_two_nodes_is_never_double_claimed(
    containerd_factory: Callable[..., ContainerdInstance], inst: ContainerdInstance, tmp_path: Path
) -> None:
    shared = tmp_path / "shared-store"
    version = "1.7" if inst.is_1_7 else "2"
    node_a = containerd_factory(version, store=shared)
    node_b = containerd_factory(version, store=shared)
    a, b = node_a.cri(), node_b.cri()
    try:
        old = [Incarnation(a, node_a, tmp_path, f"web-7d4b9c8f6d-{_suffix()}", labels=TEMPLATE) for _ in range(2)]
        before = _run_and_stop(old)
        wait_published(node_a, 2)
        # Three new replicas at once, two on the other node: two restores and a cold start.
        new = [
            Incarnation(client_, node, tmp_path, f"web-7d4b9c8f6d-{_suffix()}", labels=TEMPLATE)
            for client_, node in ((a, node_a), (b, node_b), (b, node_b))
        ]
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda pod: pod.create(), new))
        time.sleep(0.5)
        firsts = [pod.first() for pod in new]
        restored = sorted(s for c, s, _ in firsts if c > 1)
        assert restored == sorted(s for _, s in before), (before, firsts)
        assert sum(1 for c, _, _ in firsts if c == 1) == 1
    finally:
        for c in (a, b):
            c.remove_all(stop_timeout=0)
            c.close()
        node_a.stop()
        node_b.stop()


def _first_row(client: CRIClient, cid: str) -> tuple[int, int]:
    deadline = time.monotonic() + 10 * host.TIME_SCALE
    while True:
        rows = [line.message.split() for line in parse_cri_log(client.read_log(cid))]
        rows = [r for r in rows if len(r) == 3 and all(x.isdigit() for x in r)]
        if rows:
            return int(rows[0][0]), int(rows[0][1])
        assert time.monotonic() < deadline, "no workload output"
        time.sleep(0.1)


def test_each_container_of_a_pod_has_its_own_checkpoint(
    client: CRIClient, inst: ContainerdInstance, tmp_path: Path
) -> None:
    """Two app containers: each restores its own state; one whose command changed starts
    cold while the other still restores."""
    old = Incarnation(client, inst, tmp_path, f"web-7d4b9c8f6d-{_suffix()}", labels=TEMPLATE)
    app = old.create(name="app")
    time.sleep(1.05)  # a state of its own (the workload seeds by the second)
    side = old.create(name="side")
    time.sleep(1.0)
    before = {}
    for cid in (app, side):
        client.stop_container(cid, timeout=round(10 * host.TIME_SCALE))
        assert client.wait_container_exit(cid, timeout=30 * host.TIME_SCALE).exit_code == 143
        before[cid] = _first_row(client, cid)[1]
    old.remove()
    wait_published(inst, 2)
    new = Incarnation(client, inst, tmp_path, f"web-7d4b9c8f6d-{_suffix()}", labels=TEMPLATE)
    app2 = new.create(name="app")
    side2 = new.create(
        name="side", command=["awk", 'BEGIN { for (n = 1; ; n++) { print n, 7, 7; fflush(); system("sleep 0.1") } }']
    )
    time.sleep(0.5)
    counter, checksum = _first_row(client, app2)
    assert counter > 1 and checksum == before[app], "the app container restored its own state"
    assert _first_row(client, side2) == (1, 7), "the changed sidecar started cold"
    notes = [x.message for x in parse_cri_log(client.read_log(side2)) if x.message.startswith("hotrestart:")]
    assert notes and "not compatible" in notes[0]
    new.remove()


def test_a_running_replicas_checkpoint_serves_its_own_restart_not_a_new_replica(
    client: CRIClient, inst: ContainerdInstance, tmp_path: Path
) -> None:
    periodic = {"hotrestart.io/checkpoint-interval": "2s"}
    a = Incarnation(client, inst, tmp_path, f"web-7d4b9c8f6d-{_suffix()}", labels=TEMPLATE, annotations=periodic)
    a.create()
    _, checksum, _ = a.state()
    wait_published(inst, timeout=30)
    # A scale-up while `a` runs: its periodic checkpoint is not for a new replica (a clone).
    b = Incarnation(client, inst, tmp_path, f"web-7d4b9c8f6d-{_suffix()}", labels=TEMPLATE, annotations=periodic)
    b.create()
    time.sleep(0.5)
    assert b.first()[0] == 1, "a new replica never clones one that still runs"
    os.kill(client.container_pid(a.cid), signal.SIGKILL)  # `a` crashes
    assert client.wait_container_exit(a.cid).exit_code == 137
    crashed_at = a.state()[0]
    a.create(attempt=1)  # the kubelet restarts it in the same pod
    first = a.first()
    assert 1 < first[0] <= crashed_at + 1 and first[1] == checksum, (first, crashed_at)
    a.remove()
    b.remove()


# The counting workload under a shell that says when it is warm (a marker file) and when it is
# told it was restored from its template (SIGUSR2 to the container's init, the shell).
WARMING = [
    "sh",
    "-c",
    'trap "echo told-restored" USR2; (sleep 2; touch /tmp/warm) & awk "$0" & while :; do wait; done',
    STATEFUL[1],
]
SNAPSHOT = {
    "hotrestart.io/snapshot": "template",
    "hotrestart.io/snapshot-marker": "/tmp/warm",
    "hotrestart.io/snapshot-signal": "SIGUSR2",
}


def _template_checkpoints(inst: ContainerdInstance) -> list[Path]:
    return [c for c in stored(inst) if json.loads((c / "manifest.json").read_text())["reason"] == "template"]


def test_a_warm_template_restores_into_three_new_replicas_and_stays(
    client: CRIClient, inst: ContainerdInstance, tmp_path: Path
) -> None:
    warm = Incarnation(client, inst, tmp_path, f"web-7d4b9c8f6d-{_suffix()}", labels=TEMPLATE, annotations=SNAPSHOT)
    warm.create(WARMING)
    assert host.wait_until(lambda: len(_template_checkpoints(inst)) == 1, 30), "no template snapshot taken"
    [snapshot] = _template_checkpoints(inst)
    at, checksum, _ = warm.state()
    # Scale-out while the warm replica runs on: each new replica restores the template.
    new = [
        Incarnation(client, inst, tmp_path, f"web-7d4b9c8f6d-{_suffix()}", labels=TEMPLATE, annotations=SNAPSHOT)
        for _ in range(3)
    ]
    for pod in new:
        pod.create(WARMING)
    addresses = set()
    for pod in new:
        first = pod.first()
        assert 1 < first[0] <= at + 1 and first[1] == checksum, ("the template's memory", first, at)
        assert any("warm snapshot" in line for line in pod.lines()[:2]), pod.lines()[:3]
        told = host.wait_until(lambda p=pod: "told-restored" in p.lines(), 10)  # type: ignore[misc]
        assert told, ("SIGUSR2 after the restore", pod.lines()[-3:])
        # The pod's own hostname: CRIU writes the template's into the pod's UTS namespace,
        # and the shim puts the pod's back.
        hostname = client.exec_sync(pod.cid, ["hostname"]).stdout.decode().strip()
        assert hostname == pod.config.metadata.name, (hostname, pod.config.metadata.name)
        address = client.pod_sandbox_status(pod.pod).network.ip
        assert address in client.exec_sync(pod.cid, ["ip", "-4", "addr"]).stdout.decode()
        addresses.add(address)
    assert len(addresses) == 3, "each replica has its own address"
    # One checkpoint, many restores: the template is still there, unclaimed, and the
    # restored replicas took none of their own.
    time.sleep(3)
    assert _template_checkpoints(inst) == [snapshot]
    assert not stored(inst, "claimed")
    assert "told-restored" not in warm.lines()
    for pod in [warm, *new]:
        pod.remove()
