"""Checkpoints that leave the container running: periodic ones, and the CRI's, against runc."""

from __future__ import annotations

import json
import time

from testbed import ContainerdInstance

from .memhog import build_memhog, frozen_after, log_rows, memhog_pod, wait_for_line
from .pods import remove_pod
from .progress import progress


def bench_running(inst: ContainerdInstance, cri, mib: int, r: dict[str, float]) -> None:
    """Checkpoints that leave the container running: periodic ones, and the CRI's."""
    memhog = build_memhog(inst.dir)
    progress("periodic checkpoint through the shim")
    annotations = {"hotrestart.io/checkpoint-interval": "20s"}
    pod, cid = memhog_pod(cri, inst, "hotrestart", "per-0", memhog, [str(mib)], annotations=annotations)
    cri.start_container(cid)
    wait_for_line(cri, cid, lambda x: x.startswith("ready"))
    n = wait_for_line(cri, cid, lambda x: x.split()[0] == "3")
    store = inst.store / "v1" / "checkpoints"
    deadline = time.monotonic() + 120
    while not (store.exists() and any(store.rglob("manifest.json"))):
        if time.monotonic() > deadline:
            raise SystemExit("no periodic checkpoint was published")
        time.sleep(0.05)
    manifest = json.loads(next(store.rglob("manifest.json")).read_text())
    r["periodic_dump"] = manifest["timings"]["dump"]
    r["periodic_durable"] = manifest["timings"]["durable"]
    r["periodic_frozen"] = frozen_after(cri, cid, int(n.split()[0]))
    progress("CRI CheckpointContainer through the shim")
    archive = inst.dir / "cri-checkpoint-hot.tar"
    n = log_rows(cri, cid)[-1][0]
    t0 = time.monotonic()
    cri.checkpoint_container(cid, str(archive), timeout=300)
    r["hot_cri_checkpoint"] = time.monotonic() - t0
    r["hot_cri_frozen"] = frozen_after(cri, cid, n)
    r["hot_cri_size"] = archive.stat().st_size
    archive.unlink()
    cri.stop_container(cid, timeout=0)
    remove_pod(cri, pod)


def print_running(r: dict[str, float], mib: int) -> None:
    print(f"\nCheckpoints that leave a container holding {mib} MiB running:\n")
    print("| measure | reference | hotrestart | ratio |")
    print("|---|---|---|---|")
    print(
        f"| application frozen: periodic checkpoint, vs plain `runc checkpoint --leave-running` to disk (s) | "
        f"{r['runc_leave_running_frozen']:.2f} | {r['periodic_frozen']:.2f} | "
        f"{r['periodic_frozen'] / r['runc_leave_running_frozen']:.2f}x |"
    )
    print(
        f"| CRI CheckpointContainer, vs the same on runc-v2 (s) | {r['cri_checkpoint']:.2f} | "
        f"{r['hot_cri_checkpoint']:.2f} | {r['hot_cri_checkpoint'] / r['cri_checkpoint']:.2f}x |"
    )
    print(
        f"| application frozen during CRI CheckpointContainer, vs runc-v2 (s) | {r['cri_frozen']:.2f} | "
        f"{r['hot_cri_frozen']:.2f} | {r['hot_cri_frozen'] / r['cri_frozen']:.2f}x |"
    )
    print(
        f"\n(periodic checkpoint: dump {r['periodic_dump']:.2f} s, durable in the store after "
        f"{r['periodic_durable']:.2f} s; plain `runc checkpoint --leave-running` took {r['runc_leave_running']:.2f} s)"
    )
