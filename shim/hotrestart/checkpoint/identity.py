"""Which checkpoints a container restores from: its workload identity, from the pod's labels.

Pods of Deployments and Jobs come back under new names, so the pod name alone finds nothing.
The kubelet's labels on the pod (read from containerd, see `workload.containerd_api`) name
the workload instead, per controller:

- `hotrestart.io/identity` annotation: that key; the newest kept.
- `statefulset.kubernetes.io/pod-name`: the pod name (a StatefulSet keeps it); the newest.
- `batch.kubernetes.io/job-name` and `controller-uid`, with `job-completion-index` for an
  indexed Job: the Job run and index; the newest (without an index, a pool of its pods).
- `pod-template-hash`: the pod template, a pool with one checkpoint per stopped replica.
- none of these: the pod name; the newest.

Every identity stays within the pod's namespace and names one container. Label values are
hostile input (pod authors write them): only what Kubernetes itself accepts as a label
value is used, anything else falls back to the pod name, with the reason recorded.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

from hotrestart.store.manifest import Identity

STATEFULSET_POD = "statefulset.kubernetes.io/pod-name"
JOB_NAME = ("batch.kubernetes.io/job-name", "job-name")
JOB_UID = ("batch.kubernetes.io/controller-uid", "controller-uid")
JOB_INDEX = "batch.kubernetes.io/job-completion-index"
TEMPLATE_HASH = "pod-template-hash"

# A Kubernetes label value: at most 63 characters, alphanumeric at both ends.
_LABEL_VALUE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?")
_INDEX = re.compile(r"0|[1-9][0-9]{0,8}")


def from_annotation(identity: Identity) -> Identity | None:
    """The annotation's identity, when the pod sets one (it overrides the labels)."""
    if identity.key:
        return dataclasses.replace(identity, source="annotation hotrestart.io/identity")
    return None


def from_labels(identity: Identity, labels: Mapping[str, str]) -> Identity:
    """`identity` (the pod's names) made into its workload's, by the pod's labels."""
    container = identity.container
    if STATEFULSET_POD in labels:
        return dataclasses.replace(identity, source="StatefulSet pod: its name")
    job = _first(labels, JOB_NAME)
    if job is not None:
        uid = _first(labels, JOB_UID)
        index = labels.get(JOB_INDEX)
        bad = _bad(job, uid, index)
        if bad:
            return by_pod_name(identity, f"Job labels unusable ({bad})")
        if index is not None:
            return dataclasses.replace(
                identity, key=f"@job/{job}/{uid}/{index}/{container}", source=f"Job {job}, completion index {index}"
            )
        return dataclasses.replace(
            identity, key=f"@job/{job}/{uid}/{container}", pool=True, source=f"Job {job}: a pool of its pods"
        )
    template = labels.get(TEMPLATE_HASH)
    if template is not None:
        if not _LABEL_VALUE.fullmatch(template):
            return by_pod_name(identity, "pod-template-hash is not a label value")
        return dataclasses.replace(
            identity,
            key=f"@template/{template}/{container}",
            pool=True,
            source=f"pod template {template}: a pool of its replicas",
        )
    return by_pod_name(identity, "no workload labels")


def template_of(pool: Identity) -> Identity | None:
    """The identity of a pod template's warm snapshot (`hotrestart.io/snapshot: template`):
    its own folder, the newest only, beside the pool of its stopped replicas. None for a pod
    that is not a pod template's replica."""
    if not pool.pool or not pool.key.startswith("@template/"):
        return None
    template = pool.key.split("/")[1]
    return dataclasses.replace(
        pool,
        key="@snapshot/" + pool.key.removeprefix("@template/"),
        pool=False,
        source=f"pod template {template}: its warm snapshot",
    )


def by_pod_name(identity: Identity, why: str) -> Identity:
    return dataclasses.replace(identity, key="", pool=False, source=f"pod name ({why})")


def _first(labels: Mapping[str, str], names: tuple[str, ...]) -> str | None:
    return next((labels[n] for n in names if n in labels), None)


def _bad(job: str, uid: str | None, index: str | None) -> str:
    if not _LABEL_VALUE.fullmatch(job):
        return "job-name is not a label value"
    if uid is None or not _LABEL_VALUE.fullmatch(uid):
        return "no usable controller-uid"
    if index is not None and not _INDEX.fullmatch(index):
        return "job-completion-index is not a number"
    return ""
