"""Pod and container configs built as a kubelet sends them (runtime.v1 messages)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from .proto import NS_CONTAINER, NS_NODE, NS_POD


def pod_config(
    a: ModuleType,
    name: str,
    namespace: str = "default",
    uid: str | None = None,
    attempt: int = 0,
    *,
    annotations: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
    log_directory: str | Path | None = None,
    hostname: str | None = None,
    cgroup_parent: str | None = None,
    share_pid: bool = False,
    host_network: bool = False,
) -> Any:
    """A PodSandboxConfig as a kubelet would send it."""
    uid = uid or str(uuid.uuid4())
    ns = a.NamespaceOption(
        network=NS_NODE if host_network else NS_POD,
        pid=NS_POD if share_pid else NS_CONTAINER,
        ipc=NS_POD,
    )
    linux = a.LinuxPodSandboxConfig(
        cgroup_parent=cgroup_parent or "",
        security_context=a.LinuxSandboxSecurityContext(namespace_options=ns),
    )
    return a.PodSandboxConfig(
        metadata=a.PodSandboxMetadata(name=name, uid=uid, namespace=namespace, attempt=attempt),
        hostname=hostname if hostname is not None else ("" if host_network else name[:63]),
        log_directory=str(log_directory) if log_directory else "",
        labels=dict(labels or {}),
        annotations=dict(annotations or {}),
        linux=linux,
    )


def container_config(
    a: ModuleType,
    name: str,
    image: str,
    command: Sequence[str] | None = None,
    args: Sequence[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    working_dir: str = "",
    tty: bool = False,
    stdin: bool = False,
    stdin_once: bool = False,
    log_path: str | None = None,
    annotations: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
    attempt: int = 0,
    memory_limit: int | None = None,
    cpu_quota: int | None = None,
    cpu_period: int | None = None,
    cpu_shares: int | None = None,
    cpuset_cpus: str | None = None,
    resources: Any = None,
    mounts: Iterable[tuple[str, str] | tuple[str, str, bool]] = (),
    share_pid: bool = False,
    privileged: bool = False,
) -> Any:
    """A ContainerConfig.  ``mounts`` are (host_path, container_path[, readonly])."""
    if resources is None:
        resources = linux_resources(
            a,
            memory_limit=memory_limit,
            cpu_quota=cpu_quota,
            cpu_period=cpu_period,
            cpu_shares=cpu_shares,
            cpuset_cpus=cpuset_cpus,
        )
    sec = a.LinuxContainerSecurityContext(
        namespace_options=a.NamespaceOption(network=NS_POD, pid=NS_POD if share_pid else NS_CONTAINER, ipc=NS_POD),
        privileged=privileged,
    )
    mount_msgs = []
    for m in mounts:
        host, ctr_path, ro = (*m, False)[:3]
        mount_msgs.append(a.Mount(host_path=str(host), container_path=ctr_path, readonly=bool(ro)))
    return a.ContainerConfig(
        metadata=a.ContainerMetadata(name=name, attempt=attempt),
        image=a.ImageSpec(image=image),
        command=list(command or []),
        args=list(args or []),
        working_dir=working_dir,
        envs=[a.KeyValue(key=k, value=v) for k, v in (env or {}).items()],
        mounts=mount_msgs,
        labels=dict(labels or {}),
        annotations=dict(annotations or {}),
        log_path=log_path if log_path is not None else f"{name}/{attempt}.log",
        stdin=stdin,
        stdin_once=stdin_once,
        tty=tty,
        linux=a.LinuxContainerConfig(resources=resources, security_context=sec),
    )


def linux_resources(
    a: ModuleType,
    *,
    memory_limit: int | None = None,
    cpu_quota: int | None = None,
    cpu_period: int | None = None,
    cpu_shares: int | None = None,
    cpuset_cpus: str | None = None,
) -> Any:
    r = a.LinuxContainerResources()
    if memory_limit is not None:
        r.memory_limit_in_bytes = memory_limit
    if cpu_quota is not None:
        r.cpu_quota = cpu_quota
        r.cpu_period = cpu_period or 100_000
    elif cpu_period is not None:
        r.cpu_period = cpu_period
    if cpu_shares is not None:
        r.cpu_shares = cpu_shares
    if cpuset_cpus is not None:
        r.cpuset_cpus = cpuset_cpus
    return r
