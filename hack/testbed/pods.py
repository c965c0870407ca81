"""Kubelet-like pod configs for the end-to-end tests."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any, Protocol

POD_NAMESPACE = "hotrestart-e2e"


class PodHost(Protocol):
    """Where pods go: a ContainerdInstance, or the node's own containerd (testbed.node)."""

    def pod_cgroup_parent(self, uid: str) -> str: ...


def unique_pod_name(base: str) -> str:
    """A DNS-label-safe pod name from ``base`` with a random suffix."""
    name = re.sub(r"[^a-z0-9-]+", "-", base.lower()).strip("-")[:40] or "pod"
    return f"{name}-{uuid.uuid4().hex[:6]}"


def make_pod_config(
    client: Any,
    instance: PodHost,
    log_root: str | Path,
    name: str = "pod",
    **kwargs: Any,
) -> Any:
    """A PodSandboxConfig with a unique name and uid, a log directory of its own
    under ``log_root`` (kubelet layout: <namespace>_<name>_<uid>) and a cgroup
    parent below the instance's.  Other keyword arguments go to
    ``CRIClient.pod_config`` (annotations, labels, share_pid, ...)."""
    uid = kwargs.pop("uid", None) or str(uuid.uuid4())
    pod_name = unique_pod_name(name)
    namespace = kwargs.pop("namespace", POD_NAMESPACE)
    log_dir = kwargs.pop("log_directory", None) or Path(log_root) / f"{namespace}_{pod_name}_{uid}"
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    kwargs.setdefault("cgroup_parent", instance.pod_cgroup_parent(uid))
    return client.pod_config(pod_name, namespace, uid, log_directory=log_dir, **kwargs)
