"""Differential end-to-end suite: every scenario runs under `runc` and `hotrestart`.

Each scenario drives containerd's CRI as a kubelet does and returns what a user can
observe (exit codes, CRI logs, exec results, stats, resources, states). The test asserts
that both handlers give the same observation, and that the observation is the right one
on its own. The module runs against containerd 2.x and 1.7.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hotpods import TIME_SCALE

from cri import CONTAINER_EXITED, CONTAINER_RUNNING, CRIClient, parse_cri_log
from testbed import BUSYBOX_IMAGE, ContainerdInstance, host
from testbed.pods import make_pod_config

pytestmark = pytest.mark.e2e

HANDLERS = ("runc", "hotrestart")
V2 = os.path.exists("/sys/fs/cgroup/cgroup.controllers")  # the unified hierarchy only
# The count is replaced atomically so that a reader never sees the file empty.
COUNTER = "i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.1; done"


class Pod:
    """One pod of one handler, removed (and checked for leftovers) by `close`."""

    def __init__(
        self,
        client: CRIClient,
        inst: ContainerdInstance,
        tmp: Path,
        handler: str,
        name: str,
        annotations: dict[str, str] | None = None,
    ) -> None:
        self.client = client
        self.inst = inst
        self.handler = handler
        self.config = make_pod_config(client, inst, tmp / "pods", f"{name}-{handler}", annotations=annotations or {})
        self.id = client.run_pod_sandbox(config=self.config, runtime_handler=handler)

    def run(self, name: str, command: list[str], **kwargs: Any) -> str:
        kwargs.setdefault("image", BUSYBOX_IMAGE)
        cid = self.client.create_container(self.id, self.config, name=name, command=command, **kwargs)
        self.client.start_container(cid)
        return cid

    def close(self) -> None:
        for c in self.client.list_containers(pod_id=self.id):
            self.client.stop_container(c.id, timeout=0)
            self.client.remove_container(c.id)
        self.client.stop_pod_sandbox(self.id)
        self.client.remove_pod_sandbox(self.id)
        assert host.wait_until(lambda: not [p for p in self.inst.shim_processes() if self.id in p.cmdline], 15)
        assert not [m for m in host.mounts_under(self.inst.state) if self.id in m]


def both(
    client: CRIClient,
    inst: ContainerdInstance,
    tmp: Path,
    name: str,
    scenario: Callable[[Pod], dict[str, Any]],
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run `scenario` under each handler; assert equal observations and return one."""
    seen = each(client, inst, tmp, name, scenario, annotations)
    assert seen["hotrestart"] == seen["runc"], seen
    return seen["runc"]


def each(
    client: CRIClient,
    inst: ContainerdInstance,
    tmp: Path,
    name: str,
    scenario: Callable[[Pod], dict[str, Any]],
    annotations: dict[str, str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run `scenario` under each handler; the observations by handler."""
    seen = {}
    for handler in HANDLERS:
        pod = Pod(client, inst, tmp, handler, name, annotations)
        try:
            seen[handler] = scenario(pod)
        finally:
            pod.close()
    return seen


def log_of(client: CRIClient, cid: str) -> list[tuple[str, str, str]]:
    return [(x.stream, x.tag, x.message) for x in parse_cri_log(client.read_log(cid))]


def test_exit_code_and_log(client: CRIClient, inst: ContainerdInstance, tmp_path: Path) -> None:
    def scenario(pod: Pod) -> dict[str, Any]:
        cid = pod.run("main", ["sh", "-c", "echo out; echo err >&2; echo partial | tr -d '\\n'; exit 7"])
        st = pod.client.wait_container_exit(cid)
        return {"exit": st.exit_code, "reason": st.reason, "log": sorted(log_of(pod.client, cid))}

    seen = both(client, inst, tmp_path, "exit", scenario)
    assert seen["exit"] == 7 and seen["reason"] == "Error"
    assert sorted(seen["log"]) == [("stderr", "F", "err"), ("stdout", "F", "out"), ("stdout", "P", "partial")]


def test_stop_delivers_sigterm(client: CRIClient, inst: ContainerdInstance, tmp_path: Path) -> None:
    def scenario(pod: Pod) -> dict[str, Any]:
        cid = pod.run("main", ["sh", "-c", "trap 'echo bye; exit 0' TERM; echo up; while :; do sleep 0.1; done"])
        pod.client.wait_container_state(cid, CONTAINER_RUNNING)
        time.sleep(0.3)
        t0 = time.monotonic()
        pod.client.stop_container(cid, timeout=10)
        took = time.monotonic() - t0
        st = pod.client.container_status(cid)
        prompt = took < 5 * TIME_SCALE
        return {"exit": st.exit_code, "reason": st.reason, "log": log_of(pod.client, cid), "prompt": prompt}

    # Hot restart changes what a stop does by design (test_hot_restart.py); with it turned
    # off for the pod, the signal must reach the process exactly as under runc.
    seen = both(client, inst, tmp_path, "stop", scenario, {"hotrestart.io/checkpoint": "off"})
    assert seen == {
        "exit": 0,
        "reason": "Completed",
        "log": [("stdout", "F", "up"), ("stdout", "F", "bye")],
        "prompt": True,
    }


def test_exec_sync(client: CRIClient, inst: ContainerdInstance, tmp_path: Path) -> None:
    def scenario(pod: Pod) -> dict[str, Any]:
        cid = pod.run("main", ["sh", "-c", COUNTER])
        pod.client.wait_container_state(cid, CONTAINER_RUNNING)
        r1 = pod.client.exec_sync(cid, ["sh", "-c", "echo out; echo err >&2; exit 3"])
        r2 = pod.client.exec_sync(cid, ["cat", "/proc/1/cmdline"])
        r3 = pod.client.exec_sync(cid, ["sh", "-c", "head -c 200000 /dev/zero | tr '\\0' x"])
        return {"r1": tuple(r1), "r2": tuple(r2), "big": (len(r3.stdout), r3.exit_code)}

    seen = both(client, inst, tmp_path, "exec", scenario)
    assert seen["r1"] == (b"out\n", b"err\n", 3)
    assert seen["r2"][0].startswith(b"sh\0-c\0")
    assert seen["big"] == (200000, 0)


def test_tty_container(client: CRIClient, inst: ContainerdInstance, tmp_path: Path) -> None:
    def scenario(pod: Pod) -> dict[str, Any]:
        cid = pod.run("main", ["sh", "-c", "tty; stty size; echo done"], tty=True)
        st = pod.client.wait_container_exit(cid)
        messages = [m.strip() for _s, _t, m in log_of(pod.client, cid)]
        return {"exit": st.exit_code, "log": messages}

    seen = both(client, inst, tmp_path, "tty", scenario)
    assert seen["exit"] == 0
    assert seen["log"][0].startswith("/dev/pts/") and seen["log"][-1] == "done"


def test_stats_and_resource_update(client: CRIClient, inst: ContainerdInstance, tmp_path: Path) -> None:
    def scenario(pod: Pod) -> dict[str, Any]:
        cid = pod.run("main", ["sh", "-c", COUNTER], memory_limit=128 << 20)
        pod.client.wait_container_state(cid, CONTAINER_RUNNING)
        time.sleep(0.5)
        stats = pod.client.container_stats(cid)
        pod.client.update_container_resources(cid, memory_limit=96 << 20, cpu_shares=512)
        # The container's own view of its limits: v1 files, or v2 ones on a unified node (there
        # runc turns the shares into a cpu.weight).
        files = ("memory.max", "cpu.weight") if V2 else ("memory/memory.limit_in_bytes", "cpu/cpu.shares")
        limit, shares = (pod.client.exec_sync(cid, ["cat", f"/sys/fs/cgroup/{f}"]).stdout.strip() for f in files)
        return {
            "has_cpu": stats.cpu.usage_core_nano_seconds.value > 0,
            "has_memory": stats.memory.working_set_bytes.value > 0 and stats.memory.usage_bytes.value > 0,
            "id": stats.attributes.id == cid,
            "limit": int(limit),
            "shares": int(shares),
        }

    seen = both(client, inst, tmp_path, "stats", scenario)
    # runc 1.3's shares-to-weight mapping (1024 shares give the default weight, 100).
    weight = math.ceil(10 ** ((math.log2(512) ** 2 + 125 * math.log2(512)) / 612 - 7 / 34))
    assert seen == {"has_cpu": True, "has_memory": True, "id": True, "limit": 96 << 20, "shares": weight if V2 else 512}


def test_pause_resume(client: CRIClient, inst: ContainerdInstance, tmp_path: Path) -> None:
    def scenario(pod: Pod) -> dict[str, Any]:
        cid = pod.run("main", ["sh", "-c", COUNTER])
        pod.client.wait_container_state(cid, CONTAINER_RUNNING)
        time.sleep(0.3)
        inst.ctr("tasks", "pause", cid)
        paused = "PAUSED" in inst.ctr("tasks", "ls").stdout
        first = pod.client.exec_sync(pod.run("probe", ["sleep", "inf"]), ["true"]).exit_code  # pod still usable
        count1 = int(Path(f"/proc/{pod.client.container_pid(cid)}/root/tmp/count").read_text())
        time.sleep(0.5)
        count2 = int(Path(f"/proc/{pod.client.container_pid(cid)}/root/tmp/count").read_text())
        inst.ctr("tasks", "resume", cid)
        time.sleep(0.5)
        count3 = int(Path(f"/proc/{pod.client.container_pid(cid)}/root/tmp/count").read_text())
        return {"paused": paused, "frozen": count1 == count2, "resumed": count3 > count2, "probe": first}

    seen = both(client, inst, tmp_path, "pause", scenario)
    assert seen == {"paused": True, "frozen": True, "resumed": True, "probe": 0}


def test_oom_kill_reported(client: CRIClient, inst: ContainerdInstance, tmp_path: Path) -> None:
    def scenario(pod: Pod) -> dict[str, Any]:
        cid = pod.run("main", ["dd", "if=/dev/zero", "of=/dev/null", "bs=256M", "count=1"], memory_limit=32 << 20)
        st = pod.client.wait_container_exit(cid)
        return {"exit": st.exit_code, "reason": st.reason}

    killed = {"exit": 137, "reason": "OOMKilled"}
    if not Path("/sys/fs/cgroup/cgroup.controllers").exists():
        assert both(client, inst, tmp_path, "oom", scenario) == killed
        return
    # On cgroup v2 the test bed's containerd (2.1, 1.7) and its runc shim miss some kills of a
    # container that dies right after its start: the exit can be handled before the kill is
    # read from memory.events (the cgroup may be gone by then: systemd removes an emptied
    # scope), and the pod shows Error (containerd#8180; fixed upstream after these releases by
    # containerd#12714, which sends the OOM event before the exit and, for the systemd driver,
    # skips critest's OOMKilled case). The shim reads the counter while the container runs and
    # again at the exit (runtime/oom.py): it must say OOMKilled every time.
    seen = each(client, inst, tmp_path, "oom", scenario)
    assert seen["hotrestart"] == killed, seen
    assert seen["runc"] in (killed, {"exit": 137, "reason": "Error"}), seen


def test_log_reopen(client: CRIClient, inst: ContainerdInstance, tmp_path: Path) -> None:
    def scenario(pod: Pod) -> dict[str, Any]:
        cid = pod.run("main", ["sh", "-c", "i=0; while :; do i=$((i+1)); echo line$i; sleep 0.1; done"])
        pod.client.wait_container_state(cid, CONTAINER_RUNNING)
        time.sleep(0.5)
        path = Path(pod.client.container_status(cid).log_path)
        os.rename(path, f"{path}.1")
        pod.client.reopen_container_log(cid)
        time.sleep(0.5)
        return {"rotated": bool(Path(f"{path}.1").read_text()), "fresh": bool(path.read_text())}

    assert both(client, inst, tmp_path, "reopen", scenario) == {"rotated": True, "fresh": True}


def test_no_process_left_after_pod_removal(client: CRIClient, inst: ContainerdInstance, tmp_path: Path) -> None:
    def scenario(pod: Pod) -> dict[str, Any]:
        cid = pod.run("main", ["sh", "-c", COUNTER])
        pod.client.wait_container_state(cid, CONTAINER_RUNNING)
        pid = pod.client.container_pid(cid)
        pod.close()
        gone = host.wait_until(lambda: not host.alive(pid), 10)
        return {"container_gone": gone, "shims": [p.cmdline for p in inst.shim_processes() if pod.id in p.cmdline]}

    for handler in HANDLERS:
        pod = Pod(client, inst, tmp_path, handler, "cleanup")
        assert scenario(pod) == {"container_gone": True, "shims": []}


def test_reattach_after_containerd_restart(client: CRIClient, inst: ContainerdInstance, tmp_path: Path) -> None:
    pods = {h: Pod(client, inst, tmp_path, h, "restart") for h in HANDLERS}
    try:
        cids = {h: p.run("main", ["sh", "-c", COUNTER]) for h, p in pods.items()}
        for cid in cids.values():
            client.wait_container_state(cid, CONTAINER_RUNNING)
        pids = {h: client.container_pid(cid) for h, cid in cids.items()}
        inst.restart()
        client.wait_ready()
        for h, cid in cids.items():
            st = client.container_status(cid)
            assert st.state == CONTAINER_RUNNING, (h, st)
            assert client.container_pid(cid) == pids[h]
            assert client.exec_sync(cid, ["cat", "/tmp/count"]).exit_code == 0, h
            client.stop_container(cid, timeout=0)
            st = client.wait_container_exit(cid)
            assert (st.state, st.exit_code) == (CONTAINER_EXITED, 137), h
    finally:
        for pod in pods.values():
            pod.close()
