#!/usr/bin/env python3
"""`make demo`: a private containerd with the hotrestart runtime registered, and one pod run
through it the way a kubelet would (RunPodSandbox, CreateContainer, StartContainer, ExecSync,
StopContainer), then everything removed again."""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

from cri import CONTAINER_RUNNING  # noqa: E402
from testbed import BUSYBOX_IMAGE, ContainerdInstance  # noqa: E402
from testbed.pods import make_pod_config  # noqa: E402


def main() -> int:
    with ContainerdInstance(shim_bin_dir=Path(sys.executable).parent) as inst:
        print(f"containerd {inst.major}.x is up at {inst.address} (config {inst.config_path})")
        print("runtime handler 'hotrestart' -> runtime_type io.containerd.hotrestart.v2\n")
        cri = inst.cri()
        config = make_pod_config(cri, inst, inst.dir / "pods", "demo")
        pod = cri.run_pod_sandbox(config=config, runtime_handler="hotrestart")
        ip = cri.pod_sandbox_status(pod).network.ip
        print(f"pod {config.metadata.name} running under hotrestart, IP {ip}")
        cid = cri.create_container(
            pod,
            config,
            name="counter",
            image=BUSYBOX_IMAGE,
            command=["sh", "-c", "i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.2; done"],
        )
        cri.start_container(cid)
        cri.wait_container_state(cid, CONTAINER_RUNNING)
        time.sleep(1.2)
        result = cri.exec_sync(cid, ["sh", "-c", "echo hello from exec in $(hostname)"])
        print(f"exec: {result.stdout.decode().strip()} (exit {result.exit_code})")
        stats = cri.container_stats(cid)
        print(
            f"stats: {stats.memory.working_set_bytes.value // 1024} KiB working set, "
            f"{stats.cpu.usage_core_nano_seconds.value // 1_000_000} ms CPU"
        )
        cri.stop_container(cid, timeout=2)
        status = cri.container_status(cid)
        print(f"stopped: exit code {status.exit_code} ({status.reason})")
        print("container log (CRI format):")
        for line in cri.read_log(cid).splitlines()[:5]:
            print(f"  {line}")
        cri.remove_container(cid)
        cri.stop_pod_sandbox(pod)
        cri.remove_pod_sandbox(pod)
        cri.close()
        print("\npod removed; stopping containerd and cleaning up")
    return 0


if __name__ == "__main__":
    sys.exit(main())
