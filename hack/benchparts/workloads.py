"""Deployments and Jobs drained and created again under new names: restored by their labels;
and new replicas of a Deployment restored from its warm template (`hotrestart.io/snapshot`)."""

from __future__ import annotations

import json
import statistics
import time
import uuid
from pathlib import Path

from testbed import ContainerdInstance

from .memhog import build_memhog, log_rows, memhog_pod, wait_for_line
from .pods import remove_pod
from .progress import progress

TEMPLATE = {"app": "svc", "pod-template-hash": "6c9f8d7b5f"}


def _job(uid: str) -> dict[str, str]:
    return {"batch.kubernetes.io/job-name": "train", "batch.kubernetes.io/controller-uid": uid}


def _published(inst: ContainerdInstance) -> int:
    base = inst.store / "v1" / "checkpoints"
    return sum(1 for d in base.iterdir() for _ in d.iterdir()) if base.exists() else 0


def _cycle(
    inst: ContainerdInstance, cri, memhog: Path, mib: int, names: list[str], labels: dict[str, str]
) -> list[float]:
    """Run the pods, stop them as a drain does, create them again under new names: the
    seconds from RunPodSandbox to serving of each new pod (asserting each restored)."""
    # All running before any stops, as in a drain: a pod created after one of them stopped
    # would restore that one (which is the point, but not of this measurement).
    running = []
    for name in names:
        pod, cid = memhog_pod(cri, inst, "hotrestart", name, memhog, [str(mib)], labels=labels)
        cri.start_container(cid)
        running.append((pod, cid))
    checksums = set()
    for pod, cid in running:
        wait_for_line(cri, cid, lambda x: x[:1].isdigit() and int(x.split()[0]) >= 3)
        cri.stop_container(cid, timeout=60)
        checksums.add(log_rows(cri, cid)[0][1])
        remove_pod(cri, pod)
    deadline = time.monotonic() + 120
    while _published(inst) < len(names) and time.monotonic() < deadline:
        time.sleep(0.05)
    took = []
    for name in names:
        t0 = time.monotonic()
        pod, cid = memhog_pod(cri, inst, "hotrestart", f"{name}-new", memhog, [str(mib)], labels=labels)
        cri.start_container(cid)
        first = wait_for_line(cri, cid, lambda x: x[:1].isdigit())
        took.append(time.monotonic() - t0)
        if int(first.split()[0]) <= 1 or int(first.split()[1]) not in checksums:
            raise SystemExit(f"{name}: started cold ({first})")
        cri.stop_container(cid, timeout=0)
        remove_pod(cri, pod)
    return took


def _template_published(inst: ContainerdInstance) -> bool:
    base = inst.store / "v1" / "checkpoints"
    for folder in base.iterdir() if base.exists() else []:
        for ckpt in folder.iterdir():
            try:
                if json.loads((ckpt / "manifest.json").read_text())["reason"] == "template":
                    return True
            except (OSError, ValueError, KeyError):
                continue
    return False


def _scale_out(inst: ContainerdInstance, cri, memhog: Path, mib: int, warmup: float) -> list[float]:
    """One replica warms up and is snapshotted as its template's; three new replicas restore
    it while it runs on: the seconds from RunPodSandbox to serving of each."""
    hash_ = "5b8d7c6f4e"
    labels = {"app": "svc-warm", "pod-template-hash": hash_}
    annotations = {"hotrestart.io/snapshot": "template", "hotrestart.io/snapshot-after": f"{warmup + 1:.0f}s"}
    args = [str(mib), str(warmup)]
    warm, cid = memhog_pod(
        cri, inst, "hotrestart", f"svc-{hash_}-warm", memhog, args, labels=labels, annotations=annotations
    )
    cri.start_container(cid)
    wait_for_line(cri, cid, lambda x: x.startswith("ready"))
    deadline = time.monotonic() + 120
    while not _template_published(inst) and time.monotonic() < deadline:
        time.sleep(0.05)
    if not _template_published(inst):
        raise SystemExit("no template snapshot was published")
    took = []
    for _ in range(3):
        t0 = time.monotonic()
        name = f"svc-{hash_}-{uuid.uuid4().hex[:5]}"
        pod, new = memhog_pod(cri, inst, "hotrestart", name, memhog, args, labels=labels, annotations=annotations)
        cri.start_container(new)
        first = wait_for_line(cri, new, lambda x: x[:1].isdigit())
        took.append(time.monotonic() - t0)
        if int(first.split()[0]) <= 1:
            raise SystemExit(f"{name}: started cold ({first})")
        cri.stop_container(new, timeout=0)
        remove_pod(cri, pod)
    cri.stop_container(cid, timeout=0)
    remove_pod(cri, warm)
    return took


def bench_workloads(inst: ContainerdInstance, cri, mib: int, warmup: float) -> None:
    memhog = build_memhog(inst.dir)
    progress("a Deployment's three replicas drained and created again")
    hash_ = TEMPLATE["pod-template-hash"]
    replicas = _cycle(inst, cri, memhog, mib, [f"svc-{hash_}-{uuid.uuid4().hex[:5]}" for _ in range(3)], TEMPLATE)
    progress("a Job's pod drained and created again")
    job = _cycle(inst, cri, memhog, mib, [f"train-{uuid.uuid4().hex[:5]}"], _job(str(uuid.uuid4())))
    progress("three new replicas restored from a warm template")
    scaled = _scale_out(inst, cri, memhog, mib, warmup)
    progress("the same service started cold, with a slow start")
    t0 = time.monotonic()
    pod, cid = memhog_pod(cri, inst, "hotrestart", "cold-w", memhog, [str(mib), str(warmup)])
    cri.start_container(cid)
    wait_for_line(cri, cid, lambda x: x.startswith("ready"))
    cold = time.monotonic() - t0
    cri.stop_container(cid, timeout=0)
    remove_pod(cri, pod)
    print(f"\nWorkloads coming back under new pod names, {mib} MiB each, no annotation:\n")
    print("| measure | cold start (s) | restored (s) | ratio |")
    print("|---|---|---|---|")
    med = statistics.median(replicas)
    print(f"| Deployment replica, pod sandbox to serving (median of 3) | {cold:.2f} | {med:.2f} | {med / cold:.2f}x |")
    print(f"| Job pod, pod sandbox to serving | {cold:.2f} | {job[0]:.2f} | {job[0] / cold:.2f}x |")
    med = statistics.median(scaled)
    label = "new replica from the warm template, pod sandbox to serving (median of 3)"
    print(f"| {label} | {cold:.2f} | {med:.2f} | {med / cold:.2f}x |")
    each = ", ".join(f"{t:.2f}" for t in scaled)
    print(f"\n(replicas: {', '.join(f'{t:.2f}' for t in replicas)} s; from the template: {each} s;")
    print(f" cold start with a {warmup:.0f} s warm-up)")
