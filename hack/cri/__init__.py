"""CRI (Kubernetes runtime.v1) client for the end-to-end tests.

The gRPC bindings are generated on first use from the test bed's api.proto
into hack/cri/gen/ (see _gen.py); importing this package alone does not
need the test bed.
"""

from .client import CRIClient, ExecResult
from .logs import LogLine, parse_cri_log
from .proto import (
    CONTAINER_CREATED,
    CONTAINER_EXITED,
    CONTAINER_RUNNING,
    CONTAINER_UNKNOWN,
    NS_CONTAINER,
    NS_NODE,
    NS_POD,
    SANDBOX_NOTREADY,
    SANDBOX_READY,
    api,
    state_name,
)

__all__ = [
    "CONTAINER_CREATED",
    "CONTAINER_EXITED",
    "CONTAINER_RUNNING",
    "CONTAINER_UNKNOWN",
    "NS_CONTAINER",
    "NS_NODE",
    "NS_POD",
    "SANDBOX_NOTREADY",
    "SANDBOX_READY",
    "CRIClient",
    "ExecResult",
    "LogLine",
    "api",
    "parse_cri_log",
    "state_name",
]
