"""The memory-holding workload (hack/memhog.c): building it, running it in a pod, reading its log."""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

from cri import parse_cri_log
from testbed import BUSYBOX_IMAGE

HACK = Path(__file__).resolve().parent.parent


def build_memhog(dest: Path) -> Path:
    binary = dest / "memhog"
    source = str(HACK / "memhog.c")
    subprocess.run(["gcc", "-static", "-O2", "-pthread", "-o", str(binary), source], check=True)
    return binary


def wait_for_line(cri, cid: str, predicate, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in (x.message for x in parse_cri_log(cri.read_log(cid))):
            if predicate(line):
                return line
        time.sleep(0.01)
    raise TimeoutError(f"no matching line in the log of {cid}")


def memhog_pod(
    cri, inst, handler: str, name: str, memhog: Path, args: list[str], env: dict[str, str] | None = None, **kw: Any
) -> tuple[str, str]:
    uid = str(uuid.uuid4())
    logs = inst.dir / "bench-logs" / uid
    logs.mkdir(parents=True)
    config = cri.pod_config(name, "bench", uid, log_directory=logs, cgroup_parent=inst.pod_cgroup_parent(uid), **kw)
    pod = cri.run_pod_sandbox(config=config, runtime_handler=handler)
    cid = cri.create_container(
        pod,
        config,
        name="svc",
        image=BUSYBOX_IMAGE,
        command=["/memhog", *args],
        mounts=[(str(memhog), "/memhog", True)],
        env=env,
    )
    return pod, cid


def rows(lines: list[str]) -> list[tuple[int, int, int]]:
    """memhog's "counter checksum stall-ms" lines."""
    out = []
    for line in lines:
        parts = line.split()
        if len(parts) == 3 and all(p.isdigit() for p in parts):
            out.append((int(parts[0]), int(parts[1]), int(parts[2])))
    return out


def log_rows(cri, cid: str) -> list[tuple[int, int, int]]:
    return rows([x.message for x in parse_cri_log(cri.read_log(cid))])


def frozen_after(cri, cid: str, counter: int, settle: float = 1.5) -> float:
    """The longest stop memhog saw after line `counter` (seconds), once it ran on a while."""
    time.sleep(settle)
    return max((stall for n, _, stall in log_rows(cri, cid) if n > counter), default=0) / 1000
