"""The generated runtime.v1 bindings, loaded on first use, and the proto's enum values."""

from __future__ import annotations

from types import ModuleType

_API: ModuleType | None = None
_GRPC: ModuleType | None = None


def load() -> tuple[ModuleType, ModuleType]:
    """The message and gRPC stub modules, generated first if they are out of date."""
    global _API, _GRPC
    if _API is None or _GRPC is None:
        from ._gen import ensure_generated

        ensure_generated()
        from .gen import cri_runtime_v1_pb2 as api_mod
        from .gen import cri_runtime_v1_pb2_grpc as grpc_mod

        _API, _GRPC = api_mod, grpc_mod
    return _API, _GRPC


def api() -> ModuleType:
    """The generated runtime.v1 message module (``cri_runtime_v1_pb2``)."""
    return load()[0]


# ContainerState / PodSandboxState / NamespaceMode values (stable in the proto).
CONTAINER_CREATED = 0
CONTAINER_RUNNING = 1
CONTAINER_EXITED = 2
CONTAINER_UNKNOWN = 3
SANDBOX_READY = 0
SANDBOX_NOTREADY = 1
NS_POD = 0
NS_CONTAINER = 1
NS_NODE = 2


def state_name(state: int) -> str:
    return str(api().ContainerState.Name(state))
