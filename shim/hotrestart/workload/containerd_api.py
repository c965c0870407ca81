"""A container's labels, read from containerd's own gRPC API (Containers/Get).

containerd's CRI plugin stores a pod's sandbox container under the sandbox id, labelled
with the pod's labels from its PodSandboxConfig (plus the pause image's and its own
`io.cri-containerd.kind`), so the sandbox id from the `io.kubernetes.cri.sandbox-id`
annotation names the pod's labels.

grpc is imported on first use, never at module import: it adds megabytes to every pod's
shim, and the zygote that forks the shims must not hold gRPC's threads when it forks.
The call runs on sync grpc in a worker thread rather than grpc.aio, so no gRPC poller is
tied to the shim's event loop; the channel lives only for the one call.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import stat
from typing import Any

from hotrestart.errors import ContainerdAPIError

GET_METHOD = "/containerd.services.containers.v1.Containers/Get"
# containerd reads the namespace of a gRPC call from this metadata key.
NAMESPACE_HEADER = "containerd-namespace"

# Labels come from pod authors (and the pause image): a pod with more is refused, not trimmed,
# so that no identity is ever derived from part of the labels. Kubernetes pods carry tens.
MAX_LABELS = 256
MAX_LABEL_BYTES = 64 * 1024  # all keys and values, UTF-8
# The answer also carries the OCI spec and the CRI plugin's sandbox metadata (the whole
# PodSandboxConfig, annotations included; Kubernetes caps those at 256 KiB).
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
MAX_TIMEOUT = 60.0

# containerd's identifier rule (pkg/identifiers), which namespaces and container ids obey.
_IDENTIFIER = re.compile(r"[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*\Z")
_IDENTIFIER_MAX = 76


async def container_labels(address: str, namespace: str, container_id: str, *, timeout: float = 2.0) -> dict[str, str]:
    """The labels of container `container_id` in `namespace` of the containerd at `address`
    (a socket path or unix://path). Raises ContainerdAPIError, saying why, on any failure."""
    path = _socket_path(address)
    _check_identifier("namespace", namespace)
    _check_identifier("container id", container_id)
    if not isinstance(timeout, int | float) or not math.isfinite(timeout) or not 0 < timeout <= MAX_TIMEOUT:
        raise ContainerdAPIError(f"timeout must be a number of seconds in (0, {MAX_TIMEOUT:g}], not {timeout!r}")
    _check_socket(path)
    # grpc's deadline bounds the worker thread, also when the awaiting task is cancelled.
    try:
        container = await asyncio.to_thread(_get, path, namespace, container_id, timeout)
    except ContainerdAPIError:
        raise
    except ImportError as e:
        raise ContainerdAPIError(f"cannot call containerd: {e} (the grpcio package is needed)") from e
    except Exception as e:  # whatever grpc raises besides RpcError: still this module's one error
        raise ContainerdAPIError(f"Containers/Get at {path} failed: {type(e).__name__}: {e}") from e
    if container.id != container_id:
        raise ContainerdAPIError(f"containerd answered for container {container.id!r}, not {container_id!r}")
    return _checked_labels(container.labels, container_id)


def _socket_path(address: str) -> str:
    path = address.removeprefix("unix://")
    if not path or "://" in path or "\0" in path:
        raise ContainerdAPIError(f"containerd address {address!r} is not a unix socket path")
    return path


def _check_identifier(what: str, value: str) -> None:
    # Checked here so that a bad value gets a clear error rather than grpc's metadata error.
    if not isinstance(value, str) or len(value) > _IDENTIFIER_MAX or not _IDENTIFIER.match(value):
        raise ContainerdAPIError(f"{what} {value!r} is not a containerd identifier")


def _check_socket(path: str) -> None:
    # grpc would only report "failed to connect to all addresses"; say what is wrong.
    try:
        st = os.stat(path)
    except OSError as e:
        raise ContainerdAPIError(f"cannot reach containerd at {path}: {e.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ContainerdAPIError(f"cannot reach containerd at {path}: not a socket")


def _get(path: str, namespace: str, container_id: str, timeout: float) -> Any:
    """Containers/Get over a channel of its own (runs in a worker thread)."""
    import grpc  # type: ignore[import-untyped,unused-ignore]  # lazily: see the module's docstring

    from hotrestart.api.containerd.services.containers.v1 import containers_pb2 as pb

    options = [
        ("grpc.max_receive_message_length", MAX_RESPONSE_BYTES),
        ("grpc.enable_http_proxy", 0),
        ("grpc.enable_retries", 0),
    ]
    # An absolute path gives unix:///path; a relative one stays relative to our cwd.
    with grpc.insecure_channel(f"unix:{path}", options=options) as channel:
        get = channel.unary_unary(
            GET_METHOD,
            request_serializer=pb.GetContainerRequest.SerializeToString,
            response_deserializer=pb.GetContainerResponse.FromString,
        )
        try:
            response = get(
                pb.GetContainerRequest(id=container_id),
                timeout=timeout,
                metadata=((NAMESPACE_HEADER, namespace),),
            )
        except grpc.RpcError as e:
            raise _rpc_error(e, path, namespace, container_id, timeout) from None
    if not isinstance(response, pb.GetContainerResponse) or not response.HasField("container"):
        raise ContainerdAPIError(f"containerd at {path} answered for {container_id!r} without a container")
    return response.container


def _rpc_error(e: Any, path: str, namespace: str, container_id: str, timeout: float) -> ContainerdAPIError:
    code = e.code() if callable(getattr(e, "code", None)) else None
    name = getattr(code, "name", "UNKNOWN")  # a grpc.StatusCode
    details = (e.details() if callable(getattr(e, "details", None)) else None) or str(e)
    if name == "NOT_FOUND":
        return ContainerdAPIError(f"containerd has no container {container_id!r} in namespace {namespace!r}")
    if name == "DEADLINE_EXCEEDED":
        return ContainerdAPIError(f"containerd at {path} did not answer within {timeout:g}s")
    if name == "UNAVAILABLE":
        return ContainerdAPIError(f"cannot reach containerd at {path}: {details}")
    return ContainerdAPIError(f"containerd at {path} refused Containers/Get for {container_id!r}: {name}: {details}")


def _checked_labels(labels: Any, container_id: str) -> dict[str, str]:
    if len(labels) > MAX_LABELS:
        raise ContainerdAPIError(f"container {container_id!r} has {len(labels)} labels, more than {MAX_LABELS}")
    size = sum(len(k.encode()) + len(v.encode()) for k, v in labels.items())
    if size > MAX_LABEL_BYTES:
        raise ContainerdAPIError(f"labels of container {container_id!r} take {size} bytes, more than {MAX_LABEL_BYTES}")
    return dict(labels)
