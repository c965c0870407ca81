"""The test bed itself works: pods and containers through the CRI with plain runc.

These use only the ``runc`` runtime handler, so they say nothing about the
hotrestart shim; they guard the harness that the shim's e2e tests rely on.
"""

from __future__ import annotations

import re
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

from cri import (
    CONTAINER_EXITED,
    CONTAINER_RUNNING,
    SANDBOX_READY,
    CRIClient,
    parse_cri_log,
)
from testbed import BUSYBOX_IMAGE, ContainerdInstance, host
from testbed.pods import make_pod_config

pytestmark = pytest.mark.e2e

RUNC = "runc"


def _assert_no_pod_leftovers(inst: ContainerdInstance, pod_id: str) -> None:
    # The shim exits once its last task is deleted; give it a moment.
    assert host.wait_until(lambda: not inst.shim_processes(), timeout=15), [p.cmdline for p in inst.shim_processes()]
    assert not [m for m in host.mounts_under(inst.state) if pod_id in m]


def pod_lifecycle(client: CRIClient, inst: ContainerdInstance, config: Any) -> None:
    pod = client.run_pod_sandbox(config=config, runtime_handler=RUNC)
    status = client.pod_sandbox_status(pod)
    assert status.state == SANDBOX_READY
    assert inst.subnet and status.network.ip.startswith(inst.subnet.rsplit(".", 2)[0]), status.network.ip

    # A container that prints and exits 0.
    hello = client.create_container(pod, config, name="hello", image=BUSYBOX_IMAGE, command=["echo", "hello"])
    client.start_container(hello)
    st = client.wait_container_exit(hello, timeout=30)
    assert st.exit_code == 0, (st.reason, st.message)
    assert st.reason == "Completed"
    log = Path(st.log_path).read_text()
    assert Path(st.log_path).is_relative_to(config.log_directory)
    assert re.search(r"^\S+ stdout F hello$", log, re.M), log
    assert [(x.stream, x.tag, x.message) for x in parse_cri_log(log)] == [("stdout", "F", "hello")]

    # A long-running container: exec into it.
    sleeper = client.create_container(pod, config, name="sleeper", command=["sleep", "inf"])
    client.start_container(sleeper)
    client.wait_container_state(sleeper, CONTAINER_RUNNING, timeout=30)
    out, err, code = client.exec_sync(sleeper, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (out, err, code) == (b"out\n", b"err\n", 3)
    assert client.exec_sync(sleeper, ["cat", "/proc/1/cmdline"]).stdout == b"sleep\0inf\0"
    assert inst.shim_processes(), "no shim process found for a running pod"
    assert client.container_stats(sleeper).attributes.id == sleeper

    # Tear down like a kubelet.
    client.stop_container(sleeper, timeout=1)  # PID 1 ignores SIGTERM: SIGKILL
    st = client.wait_container_exit(sleeper, timeout=30)
    assert st.state == CONTAINER_EXITED and st.exit_code == 137
    for cid in (hello, sleeper):
        client.remove_container(cid)
    t0 = time.monotonic()
    client.stop_pod_sandbox(pod)
    assert time.monotonic() - t0 < 10, "the pause container did not stop promptly"
    client.remove_pod_sandbox(pod)
    assert not client.list_containers(pod_id=pod)
    assert pod not in {p.id for p in client.list_pod_sandboxes()}
    _assert_no_pod_leftovers(inst, pod)


def test_runc_pod_lifecycle(cri: CRIClient, containerd: ContainerdInstance, pod_config: Any) -> None:
    pod_lifecycle(cri, containerd, pod_config("smoke"))


def test_runc_checkpoint_through_cri(cri: CRIClient, pod_config: Any, tmp_path: Path) -> None:
    """CRI CheckpointContainer: containerd -> runc -> the sysroot's CRIU (leave running)."""
    config = pod_config("ckpt")
    pod = cri.run_pod_sandbox(config=config, runtime_handler=RUNC)
    counter = "i=0; while :; do i=$((i+1)); echo $i > /tmp/n; sleep 0.1; done"
    cid = cri.run_container(pod, config, name="counter", command=["sh", "-c", counter])
    cri.wait_container_state(cid, CONTAINER_RUNNING)
    archive = tmp_path / "checkpoint.tar"
    cri.checkpoint_container(cid, str(archive))
    with tarfile.open(archive) as tf:
        names = set(tf.getnames())
    assert "checkpoint/inventory.img" in names, sorted(names)[:20]
    assert cri.container_status(cid).state == CONTAINER_RUNNING
    before = int(cri.exec_sync(cid, ["cat", "/tmp/n"]).stdout)
    assert host.wait_until(lambda: int(cri.exec_sync(cid, ["cat", "/tmp/n"]).stdout) > before, 5)


def test_runc_pod_lifecycle_containerd_1_7(containerd_factory: Any, tmp_path: Path) -> None:
    inst = containerd_factory("1.7")
    assert inst.is_1_7
    with inst.cri() as client:
        assert client.version().runtime_version.startswith("1.7.")
        pod_lifecycle(client, inst, make_pod_config(client, inst, tmp_path, "smoke-17"))
    assert inst.stop() == []


def test_restart_keeps_pods_running(containerd_factory: Any, tmp_path: Path) -> None:
    inst = containerd_factory()
    with inst.cri() as client:
        config = make_pod_config(client, inst, tmp_path, "restart")
        pod = client.run_pod_sandbox(config=config, runtime_handler=RUNC)
        cid = client.run_container(pod, config, name="sleeper", command=["sleep", "inf"])
        client.wait_container_state(cid, CONTAINER_RUNNING)
        pid = client.container_pid(cid)
        assert pid > 0 and host.alive(pid)
        shims = {p.pid for p in inst.shim_processes()}
    inst.restart()
    with inst.cri() as client:
        assert client.container_status(cid).state == CONTAINER_RUNNING
        assert client.container_pid(cid) == pid and host.alive(pid)
        assert {p.pid for p in inst.shim_processes()} == shims
        assert client.exec_sync(cid, ["echo", "back"]).stdout == b"back\n"
    assert inst.stop() == []  # CRI teardown of a live pod
    assert not host.alive(pid)


@pytest.mark.parametrize("how", ["graceful", "containerd-killed"])
def test_stop_leaves_nothing_behind(containerd_factory: Any, tmp_path: Path, how: str) -> None:
    inst = containerd_factory()
    with inst.cri() as client:
        config = make_pod_config(client, inst, tmp_path, "leak")
        pod = client.run_pod_sandbox(config=config, runtime_handler=RUNC)
        cid = client.run_container(pod, config, name="sleeper", command=["sleep", "inf"])
        client.wait_container_state(cid, CONTAINER_RUNNING)
        pid = client.container_pid(cid)
    assert inst.shim_processes()
    assert host.mounts_under(inst.dir)
    if how == "containerd-killed":
        # No CRI teardown possible: stop() must SIGKILL shims and containers,
        # unmount and remove cgroups by itself.
        inst.kill_daemon()
    problems = inst.stop()
    assert problems == []
    assert not host.alive(pid)
    assert not inst.processes()
    assert not inst.shim_processes()
    assert not host.mounts_under(inst.dir)
    assert not inst.dir.exists()
    assert inst.bridge and not host.link_exists(inst.bridge)
    for mnt in host.cgroup_mounts():
        assert not (mnt / inst.cgroup_parent.lstrip("/")).exists(), mnt
    # libcni's result cache (normally dropped by CNI DEL) must not name our netns.
    for cache in Path("/var/lib/cni/results").glob("*"):
        assert str(inst.dir) not in cache.read_text(errors="replace"), cache
