"""The installer's DaemonSet pod, run through the CRI the way a kubelet runs it.

The DaemonSet is rendered from runtime-class/ with kustomize; its one container gets the same
command, environment, privileges and host mount (the host's `/`, or a directory standing in
for it). The installer may restart containerd while it runs (it does on a node whose
configuration it changed), so every CRI call here waits for containerd to answer again.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import yaml

from cri import NS_NODE, NS_POD, CRIClient
from testbed import host
from testbed.ci import in_ci
from testbed.pods import PodHost, make_pod_config

REPO = Path(__file__).resolve().parents[2]
NODE_NAME = "node-a"
T = TypeVar("T")


def installer_image() -> Path:
    """dist/hotrestart-installer-<version>.oci.tar (`make installer`); a failure under CI."""
    from hotrestart import __version__

    archive = REPO / "dist" / f"hotrestart-installer-{__version__}.oci.tar"
    if not archive.is_file():
        message = f"no installer image at {archive} (run `make installer`)"
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return archive


def render(overlay: str) -> dict[str, Any]:
    """The DaemonSet of runtime-class/<overlay>, as `kustomize build` gives it."""
    kustomize = shutil.which("kustomize")
    assert kustomize, "kustomize is missing (hack/install-testbed.sh installs it)"
    out = subprocess.run(
        [kustomize, "build", str(REPO / "runtime-class" / overlay)], capture_output=True, text=True, check=True
    ).stdout
    [ds] = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "DaemonSet"]
    return ds


def answered(call: Callable[[], T], timeout: float = 120) -> T:
    """call(), again while containerd is down (UNAVAILABLE) for up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
        time.sleep(0.2)


def run_until_logged(
    client: CRIClient, node: PodHost, tmp: Path, ds: dict[str, Any], host_root: Path, done: str, timeout: float = 120
) -> str:
    """Run the DaemonSet's container on this node until it logs `done`, then stop it as a
    kubelet would (it must exit 0) and remove its pod; returns its log."""
    spec = ds["spec"]["template"]["spec"]
    [container] = spec["containers"]
    a = client.api
    env = {}
    for item in container.get("env", []):
        if "valueFrom" in item:
            assert item["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName", item
            env[item["name"]] = NODE_NAME
        else:
            env[item["name"]] = item.get("value", "")
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = []
    for m in container["volumeMounts"]:
        source = volumes[m["name"]]["hostPath"]["path"]
        assert source == "/", f"only the host's root is expected: {source}"
        mounts.append((str(host_root), m["mountPath"], m.get("mountPropagation", "None")))
    privileged = bool(container.get("securityContext", {}).get("privileged"))
    pid_mode = NS_NODE if spec.get("hostPID") else NS_POD

    pod = make_pod_config(client, node, tmp / "installer-pods", "hotrestart-installer", namespace="hotrestart-system")
    pod.linux.security_context.privileged = privileged
    pod.linux.security_context.namespace_options.pid = pid_mode
    pod_id = client.run_pod_sandbox(config=pod, runtime_handler="runc")
    config = client.container_config(
        container["name"],
        container["image"],
        command=container.get("command"),
        args=container.get("args"),
        env=env,
        mounts=[(src, dst) for src, dst, _ in mounts],
        privileged=privileged,
    )
    config.linux.security_context.namespace_options.pid = pid_mode
    for msg, (_, _, propagation) in zip(config.mounts, mounts, strict=True):
        msg.propagation = {
            "HostToContainer": a.PROPAGATION_HOST_TO_CONTAINER,
            "Bidirectional": a.PROPAGATION_BIDIRECTIONAL,
        }.get(propagation, a.PROPAGATION_PRIVATE)
    cid = client.create_container(pod_id, pod, config=config)
    client.start_container(cid)
    log_path = Path(answered(lambda: client.container_status(cid).log_path))

    def log() -> str:
        return log_path.read_text(errors="replace") if log_path.exists() else ""

    assert host.wait_until(lambda: done in log(), timeout, interval=0.2), log()
    answered(lambda: client.stop_container(cid, timeout=30))  # --wait ends on SIGTERM, undoing nothing
    status = client.wait_container_exit(cid)
    assert status.exit_code == 0, (status.exit_code, log())
    client.remove_container(cid)
    client.stop_pod_sandbox(pod_id)
    client.remove_pod_sandbox(pod_id)
    return log()
