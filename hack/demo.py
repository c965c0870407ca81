#!/usr/bin/env python3
"""`make demo`: hot restart, end to end, on a private containerd with the shim registered.

A stateful pod (a service holding 256 MiB it took seconds to build, printing a counter and a
checksum of that memory) runs under `runtimeClassName: hotrestart`. The pod is stopped and
deleted the way a kubelet does on a drain, then created again with the same name: it goes
on counting with the same checksum instead of starting cold. Every step is driven through
containerd's CRI, as a kubelet would, and timed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

from cri import parse_cri_log
from testbed import BUSYBOX_IMAGE, ContainerdInstance

ROOT = Path(__file__).resolve().parent.parent


MIB = 256
WARMUP = 5.0


def say(text: str) -> None:
    print(text, flush=True)


def run_pod(cri, inst: ContainerdInstance, memhog: Path) -> tuple[str, str]:
    uid = str(uuid.uuid4())
    logs = inst.dir / "logs" / uid
    logs.mkdir(parents=True)
    config = cri.pod_config("counter-0", "demo", uid, log_directory=logs, cgroup_parent=inst.pod_cgroup_parent(uid))
    pod = cri.run_pod_sandbox(config=config, runtime_handler="hotrestart")
    cid = cri.create_container(
        pod,
        config,
        name="service",
        image=BUSYBOX_IMAGE,
        command=["/memhog", str(MIB), str(WARMUP)],
        mounts=[(str(memhog), "/memhog", True)],
    )
    return pod, cid


def lines(cri, cid: str) -> list[str]:
    return [x.message for x in parse_cri_log(cri.read_log(cid))]


def wait_line(cri, cid: str, pred, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in lines(cri, cid):
            if pred(line):
                return line
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for the service; its log: {lines(cri, cid)[-5:]}")


def main() -> int:
    with ContainerdInstance(shim_bin_dir=Path(sys.executable).parent) as inst:
        memhog = inst.dir / "memhog"
        source = str(ROOT / "hack" / "memhog.c")
        subprocess.run(["gcc", "-static", "-O2", "-pthread", "-o", str(memhog), source], check=True)
        say(f"containerd {inst.major}.x up at {inst.address}; runtime handler 'hotrestart' registered")
        say(f"checkpoint store: {inst.store}\n")
        cri = inst.cri()

        say(f"1. pod demo/counter-0 starts cold: the service builds {MIB} MiB of state (at least {WARMUP:.0f} s)")
        pod, cid = run_pod(cri, inst, memhog)
        t0 = time.monotonic()
        cri.start_container(cid)
        wait_line(cri, cid, lambda x: x.startswith("ready"))
        say(f"   ready to serve after {time.monotonic() - t0:.2f} s")
        wait_line(cri, cid, lambda x: x.split()[0] == "10")
        last = lines(cri, cid)[-1]
        say(f"   counting: {last}  (counter, checksum of its memory, longest stop in ms)\n")

        say("2. the pod is stopped and deleted, as on a node drain (StopContainer with a grace period)")
        t0 = time.monotonic()
        cri.stop_container(cid, timeout=30)
        stopped = time.monotonic() - t0
        status = cri.container_status(cid)
        last = [x for x in lines(cri, cid) if x[:1].isdigit()][-1]
        say(f"   stopped in {stopped:.2f} s, exit code {status.exit_code} (as SIGTERM would give); last line: {last}")
        cri.remove_container(cid)
        cri.stop_pod_sandbox(pod)
        cri.remove_pod_sandbox(pod)
        manifest_path = None
        while manifest_path is None:
            found = list((inst.store / "v1" / "checkpoints").rglob("manifest.json"))
            manifest_path = found[0] if found else None
            time.sleep(0.05)
        manifest = json.loads(manifest_path.read_text())
        stored = sum(f["stored_bytes"] for f in manifest["files"]) / 2**20
        raw = sum(f["raw_bytes"] for f in manifest["files"]) / 2**20
        say(
            f"   checkpoint {manifest['id']}: {stored:.0f} MiB stored ({raw:.0f} MiB raw), durable "
            f"{manifest['timings']['durable']:.2f} s after the dump began\n"
        )
        subprocess.run([sys.executable, "-m", "hotrestart.cli", "--store", str(inst.store), "ls"], check=True)

        say("\n3. the pod is created again with the same name (new sandbox, new IP)")
        pod, cid = run_pod(cri, inst, memhog)
        t0 = time.monotonic()
        cri.start_container(cid)
        took = time.monotonic() - t0
        first = wait_line(cri, cid, lambda x: x[:1].isdigit())
        say(f"   StartContainer returned after {took:.2f} s with the service already serving")
        for line in lines(cri, cid)[:2]:
            say(f"   log: {line}")
        same = first.split()[1] == last.split()[1] and int(first.split()[0]) == int(last.split()[0]) + 1
        say(
            f"   it went on from {last.split()[0]} to {first.split()[0]} with the same checksum: "
            f"{'yes' if same else 'NO'}"
        )
        cri.stop_container(cid, timeout=0)
        cri.remove_container(cid)
        cri.stop_pod_sandbox(pod)
        cri.remove_pod_sandbox(pod)
        cri.close()
        say("\npods removed; stopping containerd and cleaning up")
        return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
