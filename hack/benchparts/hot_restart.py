"""Hot restart through the shim against a cold start, CRI CheckpointContainer on runc-v2 and plain runc."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from testbed import ContainerdInstance

from .memhog import build_memhog, frozen_after, memhog_pod, wait_for_line
from .plain_runc import bench_plain_runc
from .pods import remove_pod
from .progress import progress


def bench_hot_restart(inst: ContainerdInstance, cri, mib: int, warmup: float) -> dict[str, float]:
    memhog = build_memhog(inst.dir)
    # On a VM, memory the guest never touched is slow the first time (the host backs it on
    # demand); touch plenty once so neither side of a comparison pays that.
    progress("warming the machine's memory")
    subprocess.run([str(memhog), str(min(8192, mib * 6)), "0", "once"], check=True, stdout=subprocess.DEVNULL)
    r: dict[str, float] = {}

    # Hot restart through the shim.
    progress("hot restart: run, stop, create again")
    cycle = hot_cycle(inst, cri, memhog, mib, "svc-0")
    r.update({f"hot_{k}": v for k, v in cycle.items()})

    # The same service started cold, with a slow start.
    progress("cold start with a slow start")
    pod, cid = memhog_pod(cri, inst, "hotrestart", "cold-0", memhog, [str(mib), str(warmup)])
    t0 = time.monotonic()
    cri.start_container(cid)
    wait_for_line(cri, cid, lambda x: x.startswith("ready"))
    r["cold_start"] = time.monotonic() - t0
    cri.stop_container(cid, timeout=0)
    remove_pod(cri, pod)

    # containerd's CRI CheckpointContainer with runc-v2 (leaves the container running).
    progress("CRI CheckpointContainer on runc-v2")
    pod, cid = memhog_pod(cri, inst, "runc", "cri-0", memhog, [str(mib)])
    cri.start_container(cid)
    wait_for_line(cri, cid, lambda x: x.startswith("ready"))
    archive = inst.dir / "cri-checkpoint.tar"
    n = wait_for_line(cri, cid, lambda x: x.split()[0] == "3")
    t0 = time.monotonic()
    cri.checkpoint_container(cid, str(archive), timeout=300)
    r["cri_checkpoint"] = time.monotonic() - t0
    r["cri_frozen"] = frozen_after(cri, cid, int(n.split()[0]))
    r["cri_size"] = archive.stat().st_size
    archive.unlink()
    cri.stop_container(cid, timeout=0)
    remove_pod(cri, pod)

    # Plain runc: run, checkpoint to disk (fsynced), restore, on a bundle of our own.
    progress("plain runc checkpoint and restore")
    bench_plain_runc(inst, memhog, mib, r)
    return r


def checkpoint_of(store: Path, pod: str) -> Path | None:
    """The published manifest of `pod` (a store holds other pods' checkpoints too)."""
    for path in store.rglob("manifest.json") if store.exists() else ():
        try:
            if json.loads(path.read_text())["identity"]["pod"] == pod:
                return path
        except (OSError, ValueError, KeyError):
            continue
    return None


def hot_cycle(inst: ContainerdInstance, cri, memhog: Path, mib: int, name: str) -> dict[str, float]:
    """One stop (to a durable checkpoint) and restore through the shim: times in s, sizes in bytes."""
    pod, cid = memhog_pod(cri, inst, "hotrestart", name, memhog, [str(mib)])
    cri.start_container(cid)
    wait_for_line(cri, cid, lambda x: x.startswith("ready"))
    before = wait_for_line(cri, cid, lambda x: x.split()[0] == "3")
    store = inst.store / "v1" / "checkpoints"
    r: dict[str, float] = {}
    t0 = time.monotonic()
    cri.stop_container(cid, timeout=60)
    r["stop"] = time.monotonic() - t0
    while (found := checkpoint_of(store, name)) is None:
        time.sleep(0.01)
    r["durable"] = time.monotonic() - t0
    manifest = json.loads(found.read_text())
    r["size"] = sum(f["stored_bytes"] for f in manifest["files"])
    r["raw"] = sum(f["raw_bytes"] for f in manifest["files"])
    remove_pod(cri, pod)
    pod, cid = memhog_pod(cri, inst, "hotrestart", name, memhog, [str(mib)])
    t0 = time.monotonic()
    cri.start_container(cid)
    r["restore"] = time.monotonic() - t0
    resumed = wait_for_line(cri, cid, lambda x: x[:1].isdigit())
    if resumed.split()[1] != before.split()[1]:
        raise SystemExit(f"restore lost the memory: {before} then {resumed}")
    remove_pod(cri, pod)  # a stopped restored container consumes its checkpoint
    deadline = time.monotonic() + 60
    while checkpoint_of(store, name) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    return r


def print_hot_restart(r: dict[str, float], mib: int, warmup: float) -> None:
    gb = 1e9
    print(f"\nHot restart of a container holding {mib} MiB of half-compressible memory:\n")
    print("| measure | reference | hotrestart | ratio |")
    print("|---|---|---|---|")
    print(f"| stop: signal to exit reported (s) | - | {r['hot_stop']:.2f} | |")
    print(
        f"| checkpoint durable, vs plain `runc checkpoint` + fsync (s) | {r['runc_checkpoint_durable']:.2f} | "
        f"{r['hot_durable']:.2f} | {r['hot_durable'] / r['runc_checkpoint_durable']:.2f}x |"
    )
    print(
        f"| checkpoint durable, vs CRI CheckpointContainer on runc-v2 (s) | {r['cri_checkpoint']:.2f} | "
        f"{r['hot_durable']:.2f} | {r['hot_durable'] / r['cri_checkpoint']:.2f}x |"
    )
    print(
        f"| checkpoint size, vs plain `runc checkpoint` (GB) | {r['runc_size'] / gb:.2f} | {r['hot_size'] / gb:.2f} | "
        f"{r['hot_size'] / r['runc_size']:.2f}x |"
    )
    print(
        f"| checkpoint size, vs CRI CheckpointContainer archive (GB) | {r['cri_size'] / gb:.2f} | "
        f"{r['hot_size'] / gb:.2f} | {r['hot_size'] / r['cri_size']:.2f}x |"
    )
    print(
        f"| StartContainer to running again, vs plain `runc restore` (s) | {r['runc_restore']:.2f} | "
        f"{r['hot_restore']:.2f} | {r['hot_restore'] / r['runc_restore']:.2f}x |"
    )
    print(
        f"| ready to serve, vs a cold start with a {warmup:.0f} s warm-up (s) | {r['cold_start']:.2f} | "
        f"{r['hot_restore']:.2f} | {r['hot_restore'] / r['cold_start']:.2f}x |"
    )
    print(
        f"\n(plain `runc checkpoint` without fsync: {r['runc_checkpoint']:.2f} s; raw images "
        f"{r['hot_raw'] / gb:.2f} GB)"
    )
