"""Pods of a stable identity for the hot-restart and checkpoint end-to-end tests.

The workload keeps its state only in memory: a counter and a checksum over a buffer of
random numbers drawn at start (busybox awk). A restore is proven by the counter going on
from where it stopped with the same checksum; a cold start begins again at 1 with a new one.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

from cri import CONTAINER_EXITED, CONTAINER_RUNNING, CRIClient, parse_cri_log
from testbed import BUSYBOX_IMAGE, ContainerdInstance, host

# How much slower than a real node this one is: a node VM under software emulation (hack/vm.py)
# takes seconds to start a Python helper. Stop grace periods and waits are scaled by it.
TIME_SCALE = host.TIME_SCALE
# There the stop-time checkpoint gets the scaled grace period too (less a margin for the signal).
SLOW_NODE_ANNOTATIONS = (
    {"hotrestart.io/checkpoint-timeout": f"{round(10 * TIME_SCALE * 0.9)}s"} if TIME_SCALE > 1 else {}
)

STATEFUL = [
    "awk",
    "BEGIN { srand(); for (i = 0; i < 20000; i++) { b[i] = int(rand() * 100000); s += b[i] } "
    "for (n = 1; ; n++) { t = 0; for (i = 0; i < 20000; i++) t += b[i]; "
    'printf "%d %d %d\\n", n, s, t; fflush(); system("sleep 0.1") } }',
]


class Incarnation:
    """One pod sandbox of a stable identity (namespace/name), as a StatefulSet recreates it."""

    def __init__(
        self,
        client: CRIClient,
        inst: ContainerdInstance,
        tmp: Path,
        name: str,
        *,
        annotations: dict[str, str] | None = None,
        labels: dict[str, str] | None = None,
        namespace: str = "hot",
        runtime_handler: str = "hotrestart",
    ) -> None:
        self.client = client
        self.inst = inst
        self.uid = str(uuid.uuid4())
        self.volumes = tmp / "kubelet" / self.uid / "volumes" / "kubernetes.io~empty-dir"
        logs = tmp / "logs" / f"{namespace}_{name}_{self.uid}"
        logs.mkdir(parents=True)
        self.config = client.pod_config(
            name,
            namespace,
            self.uid,
            annotations={**SLOW_NODE_ANNOTATIONS, **(annotations or {})},
            labels=labels or {},
            log_directory=logs,
            cgroup_parent=inst.pod_cgroup_parent(self.uid),
        )
        self.pod = client.run_pod_sandbox(config=self.config, runtime_handler=runtime_handler)
        self.cid = ""

    def empty_dir(self, name: str) -> Path:
        path = self.volumes / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def create(
        self,
        command: list[str] | None = None,
        *,
        name: str = "app",
        start: bool = True,
        image: str = BUSYBOX_IMAGE,
        **kwargs: Any,
    ) -> str:
        self.cid = self.client.create_container(
            self.pod, self.config, name=name, image=image, command=command or STATEFUL, **kwargs
        )
        if start:
            self.client.start_container(self.cid)
            self.client.wait_container_state(self.cid, CONTAINER_RUNNING)
        return self.cid

    def lines(self) -> list[str]:
        return [x.message for x in parse_cri_log(self.client.read_log(self.cid))]

    def _rows(self) -> list[list[str]]:
        rows = [r.split() for r in self.lines() if not r.startswith("hotrestart:")]
        return [r for r in rows if len(r) == 3 and all(x.isdigit() for x in r)]

    def state(self, timeout: float = 10) -> tuple[int, int, int]:
        """The newest (counter, checksum at start, checksum now) the workload printed."""
        deadline = time.monotonic() + timeout * TIME_SCALE
        while True:
            if rows := self._rows():
                return int(rows[-1][0]), int(rows[-1][1]), int(rows[-1][2])
            if time.monotonic() > deadline:
                raise AssertionError(f"no workload output in {self.lines()}")
            time.sleep(0.1)

    def counter(self) -> int:
        """The newest counter printed, 0 before the first row: for `wait_until`, whose own
        limit then decides (a workload may take long before its first row)."""
        rows = self._rows()
        return int(rows[-1][0]) if rows else 0

    def first(self) -> tuple[int, int, int]:
        self.state()
        row = self._rows()[0]
        return int(row[0]), int(row[1]), int(row[2])

    def stop(self, grace: int = 10) -> Any:
        self.client.stop_container(self.cid, timeout=round(grace * TIME_SCALE))
        return self.client.wait_container_exit(self.cid, timeout=30 * TIME_SCALE)

    def remove(self) -> None:
        for c in self.client.list_containers(pod_id=self.pod):
            if c.state != CONTAINER_EXITED:
                self.client.stop_container(c.id, timeout=0)
            self.client.remove_container(c.id)
        self.client.stop_pod_sandbox(self.pod)
        self.client.remove_pod_sandbox(self.pod)


def stored(inst: ContainerdInstance, state: str = "checkpoints") -> list[Path]:
    base = inst.store / "v1" / state
    if not base.exists():
        return []
    if state == "checkpoints":
        return [c for d in base.iterdir() for c in d.iterdir()]
    return list(base.iterdir())


def chunk_files(inst: ContainerdInstance, ckpt: Path, prefix: str = "images/pages-") -> list[Path]:
    """The chunk files in the store that make up a checkpoint's files named `prefix`..., in order."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    base = inst.store / "v1" / "chunks" / manifest["space"]
    return [
        base / c["digest"][:2] / c["digest"]
        for f in manifest["files"]
        if f["path"].startswith(prefix)
        for c in f["chunks"]
    ]


def wait_published(inst: ContainerdInstance, count: int = 1, timeout: float = 30) -> list[Path]:
    assert host.wait_until(lambda: len(stored(inst)) >= count, timeout), "checkpoint never published"
    return stored(inst)


def run_and_stop(client: CRIClient, inst: ContainerdInstance, tmp: Path, name: str, **kwargs: Any) -> tuple[int, int]:
    """First incarnation: run the workload a moment, stop it like a kubelet, remove the pod."""
    pod = Incarnation(client, inst, tmp, name, annotations=kwargs.pop("annotations", None))
    pod.create(**kwargs)
    time.sleep(1.0)
    st = pod.stop()
    assert st.exit_code == 143, (st.exit_code, st.reason)  # reported as SIGTERM would have
    counter, checksum, now = pod.state()
    assert checksum == now and counter >= 3
    pod.remove()
    return counter, checksum


def run_memhog(pod: Incarnation, memhog: Path, mib: int, env: dict[str, str] | None = None) -> None:
    """Create `pod` running hack/memhog.c (the `memhog` fixture) over `mib` MiB."""
    pod.create(["/memhog", str(mib)], mounts=[(str(memhog), "/memhog", True)], env=env or {})
