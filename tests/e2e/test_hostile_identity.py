"""A checkpoint is restored only into the pod it belongs to, under the context it was taken in.

Through containerd's CRI like a kubelet: the `hotrestart.io/identity` annotation names a
checkpoint within the pod's namespace only, so a pod author in another namespace cannot
claim it by writing the same key; and a pod created again with a changed security context
(another uid, a capability dropped) starts cold, since a restore would hand it the old
credentials CRIU saved.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hotpods import STATEFUL, Incarnation, stored, wait_published

from cri import CRIClient
from testbed import BUSYBOX_IMAGE, ContainerdInstance, host

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("empty_store")]

SHARED = {"hotrestart.io/identity": "shared-key"}


def restored(pod: Incarnation) -> bool:
    return any(line.startswith("hotrestart: restoring from checkpoint") for line in pod.lines())


def checkpoint_then_remove(pod: Incarnation, **kwargs: Any) -> tuple[int, int]:
    """Run the workload a moment, stop it like a kubelet (a checkpoint), remove the pod."""
    pod.create(**kwargs)
    time.sleep(1.0)
    assert pod.stop().exit_code == 143
    counter, checksum, now = pod.state()
    assert checksum == now and counter >= 3
    pod.remove()
    return counter, checksum


def test_identity_key_does_not_cross_namespaces(client: CRIClient, inst: ContainerdInstance, tmp_path: Path) -> None:
    def pod(namespace: str) -> Incarnation:
        # The same pod name too: only the namespace tells the two apart.
        return Incarnation(client, inst, tmp_path, "web-0", annotations=SHARED, namespace=namespace)

    a_counter, a_checksum = checkpoint_then_remove(pod("tenant-a"))
    wait_published(inst)

    b = pod("tenant-b")
    b.create()
    first = b.first()
    assert first[0] == 1 and not restored(b), ("another namespace's checkpoint was restored", b.lines())
    assert first[1] != a_checksum
    assert len(stored(inst)) == 1, "tenant-a's checkpoint is left alone"
    time.sleep(1.0)
    assert b.stop().exit_code == 143
    b_counter, b_checksum, _ = b.state()
    b.remove()
    assert len({c.parent.name for c in wait_published(inst, 2)}) == 2, "one checkpoint per namespace"

    a = pod("tenant-a")
    a.create()
    time.sleep(0.5)
    assert a.first()[:2] == (a_counter + 1, a_checksum), ("tenant-a must get its own checkpoint", a.lines())
    assert restored(a)
    a.remove()

    b = pod("tenant-b")
    b.create()
    time.sleep(0.5)
    assert b.first()[:2] == (b_counter + 1, b_checksum), ("tenant-b continues from its own checkpoint", b.lines())
    b.remove()
    assert not stored(inst)


def _run_as(uid: int) -> Callable[[Any], None]:
    def change(sec: Any) -> None:
        sec.run_as_user.value = uid

    return change


def _drop(capability: str) -> Callable[[Any], None]:
    def change(sec: Any) -> None:
        sec.capabilities.drop_capabilities.append(capability)

    return change


@pytest.mark.parametrize("change", [_run_as(1000), _drop("NET_RAW")], ids=["run_as_user", "drop_capability"])
def test_changed_security_context_starts_cold(
    change: Callable[[Any], None], client: CRIClient, inst: ContainerdInstance, tmp_path: Path
) -> None:
    counter, checksum = checkpoint_then_remove(Incarnation(client, inst, tmp_path, "sec-0"))
    wait_published(inst)

    changed = Incarnation(client, inst, tmp_path, "sec-0")
    config = client.container_config("app", BUSYBOX_IMAGE, STATEFUL)
    change(config.linux.security_context)
    changed.create(config=config)
    assert changed.first()[0] == 1, ("a changed security context must not be restored", changed.lines())
    assert any(
        line.startswith("hotrestart: starting cold") and "not compatible" in line and "security context" in line
        for line in changed.lines()
    ), changed.lines()
    assert len(stored(inst)) == 1, "an incompatible checkpoint is left alone"
    changed.remove()  # a stop without a grace period: no checkpoint of the changed pod

    # Under the context it was taken in, the checkpoint still restores.
    again = Incarnation(client, inst, tmp_path, "sec-0")
    again.create()
    time.sleep(0.5)
    assert again.first()[:2] == (counter + 1, checksum), again.lines()
    again.remove()
    assert host.wait_until(lambda: not stored(inst), 10)
