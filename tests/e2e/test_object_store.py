"""Hot restart through an S3 object store only: two containerd instances (two nodes) share
the test bed's Ceph RADOS Gateway and nothing else.

A pod moves from one node to the other; two nodes race for one checkpoint and exactly one
restores; a gateway that hangs at a stop leaves nothing visible (the stop is still reported
within its budget) and at a create gives a cold start.
"""

from __future__ import annotations

import base64
import concurrent.futures
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hotpods import Incarnation, run_and_stop

import objstore
from hotrestart.store.entry import Entry
from hotrestart.store.keyfile import load
from hotrestart.store.objectstore import ObjectStore
from testbed import ContainerdInstance, host

pytestmark = [pytest.mark.e2e]

TIMEOUT = "3"  # HOTRESTART_S3_TIMEOUT of both nodes: a hung gateway costs seconds, not minutes


@pytest.fixture
def nodes(
    containerd_factory: Callable[..., ContainerdInstance],
    s3_env: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[ContainerdInstance, ContainerdInstance, ObjectStore]]:
    url = objstore.fresh_url(s3_env)
    key = tmp_path / "store.key"
    key.write_text(f"k1:{base64.b64encode(os.urandom(32)).decode()}\n")
    key.chmod(0o600)
    made = []
    for name in ("a", "b"):
        env = dict(s3_env, HOTRESTART_STORE_KEY=str(key), HOTRESTART_S3_TIMEOUT=TIMEOUT)
        env["HOTRESTART_S3_STAGING"] = str(tmp_path / f"staging-{name}")
        env["HOTRESTART_S3_CACHE"] = str(tmp_path / f"chunk-cache-{name}")  # each node its own
        made.append(containerd_factory("2", store=url, env=env))
    for name, value in s3_env.items():
        monkeypatch.setenv(name, value)
    store = ObjectStore(url, keys=load(str(key)), local=str(tmp_path / "staging-test"))
    yield made[0], made[1], store
    for inst in made:
        inst.stop()
    for inst in made:
        assert not (inst.store / "v1").exists(), "nothing is written to a local store"


def _published(store: ObjectStore, pod: str, timeout: float = 60) -> Entry:
    def find() -> Entry | None:
        found = [e for e in store.entries() if e.manifest is not None and e.manifest.identity.pod == pod]
        return found[0] if found else None

    assert host.wait_until(lambda: find() is not None, timeout), f"no checkpoint of {pod} in the object store"
    entry = find()
    assert entry is not None
    return entry


def test_a_pod_moves_to_another_node_through_the_object_store(
    nodes: tuple[ContainerdInstance, ContainerdInstance, ObjectStore], tmp_path: Path
) -> None:
    node_a, node_b, store = nodes
    counter, checksum = run_and_stop(node_a.cri(), node_a, tmp_path, "s3-move-0")
    entry = _published(store, "s3-move-0")
    assert entry.state == "checkpoints" and entry.manifest is not None and entry.manifest.seal
    moved = Incarnation(node_b.cri(), node_b, tmp_path, "s3-move-0")
    moved.create()
    time.sleep(0.5)
    assert moved.first()[:2] == (counter + 1, checksum), moved.lines()
    assert any(line.startswith("hotrestart: restoring") for line in moved.lines())
    moved.remove()
    # Consumed once the restored container has run its window or ended: never restored twice.
    assert host.wait_until(lambda: not [e for e in store.entries() if e.state == "checkpoints"], 60)


def test_two_nodes_race_for_one_checkpoint_and_one_restores(
    nodes: tuple[ContainerdInstance, ContainerdInstance, ObjectStore], tmp_path: Path
) -> None:
    node_a, node_b, store = nodes
    counter, _ = run_and_stop(node_a.cri(), node_a, tmp_path, "s3-race-0")
    _published(store, "s3-race-0")
    pods = [Incarnation(n.cri(), n, tmp_path, "s3-race-0") for n in (node_a, node_b)]
    for p in pods:
        p.create(start=False)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda p: p.client.start_container(p.cid), pods))
    firsts = sorted(p.first()[0] for p in pods)
    assert firsts == [1, counter + 1], firsts
    for p in pods:
        p.remove()


def test_a_gateway_that_hangs_at_a_stop_leaves_nothing_and_the_next_start_is_cold(
    nodes: tuple[ContainerdInstance, ContainerdInstance, ObjectStore], tmp_path: Path
) -> None:
    node_a, node_b, store = nodes
    pod = Incarnation(node_a.cri(), node_a, tmp_path, "s3-hang-0")
    pod.create()
    time.sleep(1.0)
    with objstore.gateway_stopped():
        t0 = time.monotonic()
        st = pod.stop()
        took = time.monotonic() - t0
        assert st.exit_code == 143, (st.exit_code, st.reason)
        assert took < 10, f"the stop took {took:.1f}s with the gateway hung"
        pod.remove()
        time.sleep(3 * float(TIMEOUT))  # the upload gives up meanwhile
    assert not [e for e in store.entries() if e.manifest is not None]

    # What the hung gateway applied after the shim gave up (its writer object, the chunks
    # sent) is removed by a prune once the shim is gone.
    def pruned() -> bool:
        store.prune()
        store.collect(min_age=0)
        return not list(store.bucket.listing("v1/writers/")) and not list(store.bucket.listing("v1/chunks/"))

    assert host.wait_until(pruned, 60)
    again = Incarnation(node_b.cri(), node_b, tmp_path, "s3-hang-0")
    again.create()
    assert again.first()[0] == 1, again.lines()
    again.remove()


def test_a_gateway_that_hangs_at_a_create_gives_a_cold_start(
    nodes: tuple[ContainerdInstance, ContainerdInstance, ObjectStore], tmp_path: Path
) -> None:
    node_a, node_b, store = nodes
    run_and_stop(node_a.cri(), node_a, tmp_path, "s3-down-0")
    _published(store, "s3-down-0")
    with objstore.gateway_stopped():
        again = Incarnation(node_b.cri(), node_b, tmp_path, "s3-down-0")
        t0 = time.monotonic()
        again.create()
        took = time.monotonic() - t0
        assert again.first()[0] == 1, again.lines()
    assert took < 30, f"the create took {took:.1f}s with the gateway hung"
    again.remove()
    # The checkpoint is still there, whole, for a later start.
    assert _published(store, "s3-down-0").state == "checkpoints"
