"""A synchronous CRI (runtime.v1) client that drives containerd like a kubelet.

Only what the end-to-end tests need, but with kubelet-like defaults: every
container gets its own pid namespace (the pod's network and IPC namespaces
are shared), containers log to ``<pod log dir>/<name>/<attempt>.log`` in the
CRI log format, and the pod's cgroup parent is passed explicitly.

The protobuf messages are the real ones (package runtime.v1), generated on
first use from the test bed's api.proto (proto.py); ``api()`` returns that module for
building requests by hand, and ``CRIClient.runtime`` / ``CRIClient.images``
are the raw gRPC stubs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from . import messages
from .proto import CONTAINER_EXITED, load, state_name

try:
    import grpc
except ImportError:  # let `import cri` work without grpcio; using it needs grpcio
    grpc = None


class ExecResult(NamedTuple):
    stdout: bytes
    stderr: bytes
    exit_code: int


class CRIClient:
    """Blocking CRI client on a containerd socket (``unix://`` is implied)."""

    def __init__(self, socket_path: str | Path, timeout: float = 60.0) -> None:
        if grpc is None:
            raise ImportError("the CRI client needs grpcio (pip install grpcio grpcio-tools)")
        api_mod, grpc_mod = load()
        self.api = api_mod
        self.socket_path = str(socket_path)
        self.timeout = timeout
        self.channel = grpc.insecure_channel(
            f"unix://{self.socket_path}",
            options=[
                ("grpc.max_receive_message_length", 32 << 20),
                ("grpc.max_send_message_length", 32 << 20),
            ],
        )
        self.runtime = grpc_mod.RuntimeServiceStub(self.channel)
        self.images = grpc_mod.ImageServiceStub(self.channel)
        # Pod configs by sandbox id, so create_container() can default them the
        # way a kubelet passes the pod's config along with every container.
        self._pods: dict[str, Any] = {}

    # -- plumbing ---------------------------------------------------------------

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> CRIClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, stub: Any, method: str, request: Any, timeout: float | None = None) -> Any:
        return getattr(stub, method)(request, timeout=timeout or self.timeout)

    def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        """Call any RuntimeService method by name with a hand-built request."""
        return self._call(self.runtime, method, request, timeout)

    # -- runtime info -------------------------------------------------------------

    def version(self, timeout: float | None = None) -> Any:
        return self._call(self.runtime, "Version", self.api.VersionRequest(), timeout)

    def status(self, verbose: bool = False) -> Any:
        """The StatusResponse (``.status.conditions``: RuntimeReady, NetworkReady)."""
        return self._call(self.runtime, "Status", self.api.StatusRequest(verbose=verbose))

    def ready(self) -> bool:
        conds = {c.type: c.status for c in self.status().status.conditions}
        return bool(conds.get("RuntimeReady")) and bool(conds.get("NetworkReady"))

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                if self.ready():
                    return
            except grpc.RpcError as e:
                last = e
            time.sleep(0.1)
        raise TimeoutError(f"CRI at {self.socket_path} not ready after {timeout}s: {last}")

    # -- pods ---------------------------------------------------------------------

    def pod_config(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """A PodSandboxConfig as a kubelet would send it (see messages.pod_config)."""
        return messages.pod_config(self.api, name, *args, **kwargs)

    def run_pod_sandbox(
        self,
        name: str | None = None,
        namespace: str = "default",
        uid: str | None = None,
        runtime_handler: str = "",
        annotations: Mapping[str, str] | None = None,
        log_directory: str | Path | None = None,
        *,
        config: Any = None,
        timeout: float | None = None,
        **pod_config_kwargs: Any,
    ) -> str:
        """RunPodSandbox; returns the sandbox id.  Pass ``config`` or the fields."""
        if config is None:
            if name is None:
                raise TypeError("run_pod_sandbox needs a name or a config")
            config = self.pod_config(
                name,
                namespace,
                uid,
                annotations=annotations,
                log_directory=log_directory,
                **pod_config_kwargs,
            )
        resp = self._call(
            self.runtime,
            "RunPodSandbox",
            self.api.RunPodSandboxRequest(config=config, runtime_handler=runtime_handler),
            timeout,
        )
        self._pods[resp.pod_sandbox_id] = config
        return str(resp.pod_sandbox_id)

    def stop_pod_sandbox(self, pod_id: str, timeout: float | None = None) -> None:
        self._call(self.runtime, "StopPodSandbox", self.api.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout)

    def remove_pod_sandbox(self, pod_id: str, timeout: float | None = None) -> None:
        self._call(
            self.runtime,
            "RemovePodSandbox",
            self.api.RemovePodSandboxRequest(pod_sandbox_id=pod_id),
            timeout,
        )
        self._pods.pop(pod_id, None)

    def pod_sandbox_status(self, pod_id: str, verbose: bool = False) -> Any:
        """The PodSandboxStatus message (``.state``, ``.network.ip``, ...)."""
        return self.pod_sandbox_status_response(pod_id, verbose).status

    def pod_sandbox_status_response(self, pod_id: str, verbose: bool = False) -> Any:
        return self._call(
            self.runtime,
            "PodSandboxStatus",
            self.api.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=verbose),
        )

    def pod_sandbox_info(self, pod_id: str) -> dict[str, Any]:
        """The runtime's verbose ``info`` of a sandbox, JSON-decoded."""
        info = self.pod_sandbox_status_response(pod_id, verbose=True).info
        return {k: _json_or_str(v) for k, v in info.items()}

    def list_pod_sandboxes(
        self,
        state: int | None = None,
        labels: Mapping[str, str] | None = None,
        pod_id: str = "",
    ) -> list[Any]:
        a = self.api
        flt = a.PodSandboxFilter(id=pod_id, label_selector=dict(labels or {}))
        if state is not None:
            flt.state.CopyFrom(a.PodSandboxStateValue(state=state))
        return list(self._call(self.runtime, "ListPodSandbox", a.ListPodSandboxRequest(filter=flt)).items)

    # -- containers ---------------------------------------------------------------

    def container_config(self, name: str, image: str, *args: Any, **kwargs: Any) -> Any:
        """A ContainerConfig (see messages.container_config)."""
        return messages.container_config(self.api, name, image, *args, **kwargs)

    def create_container(
        self,
        pod_id: str,
        pod_config: Any = None,
        name: str = "main",
        image: str = "hotrestart.test/busybox:latest",
        command: Sequence[str] | None = None,
        args: Sequence[str] | None = None,
        *,
        config: Any = None,
        timeout: float | None = None,
        **container_config_kwargs: Any,
    ) -> str:
        """CreateContainer; returns the container id.

        ``pod_config`` defaults to the config this client used to run the pod.
        Without ``config``, the other keyword arguments go to container_config().
        """
        if pod_config is None:
            pod_config = self._pods.get(pod_id)
            if pod_config is None:
                raise ValueError(f"no pod config known for sandbox {pod_id}; pass pod_config")
        if config is None:
            config = self.container_config(name, image, command, args, **container_config_kwargs)
        resp = self._call(
            self.runtime,
            "CreateContainer",
            self.api.CreateContainerRequest(pod_sandbox_id=pod_id, config=config, sandbox_config=pod_config),
            timeout,
        )
        return str(resp.container_id)

    def start_container(self, container_id: str, timeout: float | None = None) -> None:
        self._call(
            self.runtime,
            "StartContainer",
            self.api.StartContainerRequest(container_id=container_id),
            timeout,
        )

    def run_container(self, pod_id: str, *args: Any, **kwargs: Any) -> str:
        """create_container() followed by start_container(); returns the id."""
        cid = self.create_container(pod_id, *args, **kwargs)
        self.start_container(cid)
        return cid

    def stop_container(self, container_id: str, timeout: int = 10) -> None:
        """StopContainer with a grace period of ``timeout`` seconds."""
        self._call(
            self.runtime,
            "StopContainer",
            self.api.StopContainerRequest(container_id=container_id, timeout=timeout),
            timeout + self.timeout,
        )

    def remove_container(self, container_id: str, timeout: float | None = None) -> None:
        self._call(
            self.runtime,
            "RemoveContainer",
            self.api.RemoveContainerRequest(container_id=container_id),
            timeout,
        )

    def container_status(self, container_id: str, verbose: bool = False) -> Any:
        """The ContainerStatus message: ``.state`` (CONTAINER_*), ``.exit_code``,
        ``.reason``, ``.message``, ``.started_at``, ``.finished_at``, ``.log_path``,
        ``.resources``, ..."""
        return self.container_status_response(container_id, verbose).status

    def container_status_response(self, container_id: str, verbose: bool = False) -> Any:
        return self._call(
            self.runtime,
            "ContainerStatus",
            self.api.ContainerStatusRequest(container_id=container_id, verbose=verbose),
        )

    def container_info(self, container_id: str) -> dict[str, Any]:
        """The runtime's verbose ``info`` of a container (pid, runtime spec, ...)."""
        info = self.container_status_response(container_id, verbose=True).info
        return {k: _json_or_str(v) for k, v in info.items()}

    def container_pid(self, container_id: str) -> int:
        """Host pid of the container's init process (0 when not running)."""
        info = self.container_info(container_id).get("info", {})
        return int(info.get("pid", 0)) if isinstance(info, dict) else 0

    def wait_container_state(self, container_id: str, state: int, timeout: float = 30.0, interval: float = 0.1) -> Any:
        """Poll until the container reaches ``state``; returns its ContainerStatus."""
        deadline = time.monotonic() + timeout
        st = self.container_status(container_id)
        while st.state != state:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"container {container_id} is {state_name(st.state)}, not {state_name(state)}, after {timeout}s"
                )
            time.sleep(interval)
            st = self.container_status(container_id)
        return st

    def wait_container_exit(self, container_id: str, timeout: float = 30.0) -> Any:
        return self.wait_container_state(container_id, CONTAINER_EXITED, timeout)

    def list_containers(
        self,
        pod_id: str = "",
        state: int | None = None,
        labels: Mapping[str, str] | None = None,
        container_id: str = "",
    ) -> list[Any]:
        a = self.api
        flt = a.ContainerFilter(id=container_id, pod_sandbox_id=pod_id, label_selector=dict(labels or {}))
        if state is not None:
            flt.state.CopyFrom(a.ContainerStateValue(state=state))
        return list(self._call(self.runtime, "ListContainers", a.ListContainersRequest(filter=flt)).containers)

    def container_stats(self, container_id: str) -> Any:
        """The ContainerStats message (``.cpu``, ``.memory``, ``.writable_layer``)."""
        return self._call(
            self.runtime,
            "ContainerStats",
            self.api.ContainerStatsRequest(container_id=container_id),
        ).stats

    def list_container_stats(self, pod_id: str = "") -> list[Any]:
        a = self.api
        req = a.ListContainerStatsRequest(filter=a.ContainerStatsFilter(pod_sandbox_id=pod_id))
        return list(self._call(self.runtime, "ListContainerStats", req).stats)

    def update_container_resources(
        self,
        container_id: str,
        *,
        memory_limit: int | None = None,
        cpu_quota: int | None = None,
        cpu_period: int | None = None,
        cpu_shares: int | None = None,
        cpuset_cpus: str | None = None,
        linux: Any = None,
    ) -> None:
        a = self.api
        if linux is None:
            linux = messages.linux_resources(
                a,
                memory_limit=memory_limit,
                cpu_quota=cpu_quota,
                cpu_period=cpu_period,
                cpu_shares=cpu_shares,
                cpuset_cpus=cpuset_cpus,
            )
        self._call(
            self.runtime,
            "UpdateContainerResources",
            a.UpdateContainerResourcesRequest(container_id=container_id, linux=linux),
        )

    def reopen_container_log(self, container_id: str) -> None:
        self._call(
            self.runtime,
            "ReopenContainerLog",
            self.api.ReopenContainerLogRequest(container_id=container_id),
        )

    def exec_sync(self, container_id: str, cmd: Sequence[str], timeout: int = 10) -> ExecResult:
        """ExecSync; ``timeout`` (seconds) is the command's, 0 meaning none."""
        resp = self._call(
            self.runtime,
            "ExecSync",
            self.api.ExecSyncRequest(container_id=container_id, cmd=list(cmd), timeout=timeout),
            (timeout or 300) + self.timeout,
        )
        return ExecResult(bytes(resp.stdout), bytes(resp.stderr), int(resp.exit_code))

    def checkpoint_container(self, container_id: str, location: str, timeout: int = 60) -> None:
        self._call(
            self.runtime,
            "CheckpointContainer",
            self.api.CheckpointContainerRequest(container_id=container_id, location=location, timeout=timeout),
            timeout + self.timeout,
        )

    def read_log(self, container_id: str) -> str:
        """The container's CRI log file, as text ("" when it does not exist yet)."""
        path = self.container_status(container_id).log_path
        try:
            return Path(path).read_text(errors="replace") if path else ""
        except FileNotFoundError:
            return ""

    # -- images -------------------------------------------------------------------

    def list_images(self) -> list[Any]:
        return list(self._call(self.images, "ListImages", self.api.ListImagesRequest()).images)

    def image_status(self, image: str) -> Any:
        a = self.api
        return self._call(self.images, "ImageStatus", a.ImageStatusRequest(image=a.ImageSpec(image=image))).image

    # -- cleanup ------------------------------------------------------------------

    def remove_all(self, stop_timeout: int = 5, call_timeout: float = 60.0) -> list[str]:
        """Stop and remove every container and pod (best effort); returns errors."""
        errors: list[str] = []
        try:
            containers = self.list_containers()
        except grpc.RpcError as e:
            return [f"ListContainers: {e}"]
        for c in containers:
            try:
                self.stop_container(c.id, stop_timeout)
                self.remove_container(c.id, call_timeout)
            except grpc.RpcError as e:
                errors.append(f"container {c.id}: {e.code()} {e.details()}")
        try:
            pods = self.list_pod_sandboxes()
        except grpc.RpcError as e:
            return [*errors, f"ListPodSandbox: {e}"]
        for p in pods:
            try:
                self.stop_pod_sandbox(p.id, call_timeout)
                self.remove_pod_sandbox(p.id, call_timeout)
            except grpc.RpcError as e:
                errors.append(f"pod {p.id}: {e.code()} {e.details()}")
        return errors


def _json_or_str(v: str) -> Any:
    try:
        return json.loads(v)
    except ValueError:
        return v
