"""Starting and removing the bench's idle pods."""

from __future__ import annotations

import time
from pathlib import Path

from testbed import BUSYBOX_IMAGE
from testbed.pods import make_pod_config


def start_pod(cri, inst, tmp: Path, handler: str, name: str) -> tuple[str, float]:
    config = make_pod_config(cri, inst, tmp, f"{name}-{handler}")
    t0 = time.perf_counter()
    pod = cri.run_pod_sandbox(config=config, runtime_handler=handler)
    cid = cri.create_container(pod, config, name="main", image=BUSYBOX_IMAGE, command=["sleep", "inf"])
    cri.start_container(cid)
    return pod, time.perf_counter() - t0


def remove_pod(cri, pod: str) -> None:
    cri.stop_pod_sandbox(pod)
    cri.remove_pod_sandbox(pod)
