"""A pod's labels, read back from containerd's container store as the shim reads them.

A pod sandbox is run through the CRI with the labels a kubelet sends for a Deployment
replica and for an indexed Job's pod; containerd's CRI plugin stores them on the sandbox
container under the sandbox id, which `container_labels` asks containerd's own gRPC API
for, on containerd 2.x and 1.7.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from cri import CRIClient
from hotrestart.errors import ContainerdAPIError
from hotrestart.workload.containerd_api import container_labels
from testbed import ContainerdInstance
from testbed.pods import make_pod_config

pytestmark = pytest.mark.e2e

RUNC = "runc"  # the labels are containerd's business: plain runc serves the pause container

DEPLOYMENT_REPLICA = {"app": "web", "pod-template-hash": "7d4b9c8f6d"}


def job_pod(controller_uid: str) -> dict[str, str]:
    # As the Job controller labels an indexed Job's pods (both the prefixed and legacy keys).
    return {
        "batch.kubernetes.io/job-name": "train",
        "batch.kubernetes.io/controller-uid": controller_uid,
        "batch.kubernetes.io/job-completion-index": "1",
        "job-name": "train",
        "controller-uid": controller_uid,
    }


def run_pod(
    client: CRIClient, inst: ContainerdInstance, tmp_path: Path, labels: dict[str, str]
) -> tuple[str, dict[str, str]]:
    """Run a sandbox labelled as a kubelet labels it; returns its id and the labels sent."""
    config = make_pod_config(client, inst, tmp_path / "pods", "labels")
    # The kubelet adds the pod's name, namespace and uid to the pod's own labels.
    sent = {
        **labels,
        "io.kubernetes.pod.name": config.metadata.name,
        "io.kubernetes.pod.namespace": config.metadata.namespace,
        "io.kubernetes.pod.uid": config.metadata.uid,
    }
    config.labels.update(sent)
    return client.run_pod_sandbox(config=config, runtime_handler=RUNC), sent


@pytest.mark.parametrize(
    "labels", [DEPLOYMENT_REPLICA, job_pod(str(uuid.uuid4()))], ids=["deployment-replica", "job-pod"]
)
async def test_pod_labels_come_back_from_the_sandbox_container(
    client: CRIClient, inst: ContainerdInstance, tmp_path: Path, labels: dict[str, str]
) -> None:
    sandbox_id, sent = run_pod(client, inst, tmp_path, labels)
    got = await container_labels(str(inst.address), inst.namespace, sandbox_id)
    assert got.items() >= sent.items(), got
    assert got["io.cri-containerd.kind"] == "sandbox"
    # Also with the address as containerd passes it to a shim.
    assert await container_labels(f"unix://{inst.address}", "k8s.io", sandbox_id) == got


async def test_an_unknown_container_or_namespace_is_the_clear_error(
    client: CRIClient, inst: ContainerdInstance, tmp_path: Path
) -> None:
    sandbox_id, _ = run_pod(client, inst, tmp_path, DEPLOYMENT_REPLICA)
    with pytest.raises(ContainerdAPIError, match=r"has no container '0{64}' in namespace 'k8s.io'"):
        await container_labels(str(inst.address), "k8s.io", "0" * 64)
    # The namespace travels in the call's metadata: in another one the sandbox does not exist.
    with pytest.raises(ContainerdAPIError, match=f"has no container {sandbox_id!r} in namespace 'default'"):
        await container_labels(str(inst.address), "default", sandbox_id)
