"""How checkpoint and restore costs grow with memory, and what the shared chunk store saves.

Per size: a memhog service with a periodic checkpoint; once the first periodic checkpoint
is published, the service rewrites 10% of its memory (SIGUSR1) and is stopped: the stop
writes only what changed. Then it is created again (restore to running: CreateContainer +
StartContainer until the process answers, and until it prints its old checksum; lazily, and
again in full). Against plain `runc
checkpoint` + fsync and `runc restore` of the same workload. Then ten pods holding the
same 1 GiB of data are checkpointed one after another: how much the store grows.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

from testbed import ContainerdInstance

from .memhog import build_memhog, frozen_after, log_rows, memhog_pod, wait_for_line
from .plain_runc import bench_plain_runc
from .pods import remove_pod
from .progress import progress

CHURN = 10  # percent of the memory rewritten between the periodic checkpoint and the stop
INTERVAL = "30s"


def manifests(store: Path, pod: str, reason: str) -> list[dict]:
    found = []
    # os.walk, not rglob: checkpoints are renamed away while it walks (superseded, claimed).
    for folder, _, names in os.walk(store / "v1" / "checkpoints"):
        if "manifest.json" not in names:
            continue
        try:
            data = json.loads((Path(folder) / "manifest.json").read_text())
        except (OSError, ValueError):
            continue
        if data["identity"]["pod"] == pod and data["reason"] == reason:
            found.append(data)
    return found


def wait_manifest(store: Path, pod: str, reason: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = manifests(store, pod, reason)
        if found:
            return found[0]
        time.sleep(0.02)
    raise SystemExit(f"no {reason} checkpoint of {pod} was published within {timeout:.0f}s")


def chunk_bytes(store: Path) -> int:
    base = store / "v1" / "chunks"
    return sum(p.stat().st_size for p in base.rglob("*") if p.is_file()) if base.exists() else 0


def bench_scale_size(inst: ContainerdInstance, cri, memhog: Path, mib: int) -> dict[str, float]:
    r: dict[str, float] = {}
    name = f"scale-{mib}"
    # A stop that finds a periodic checkpoint under way waits for it: give it the time.
    annotations = {"hotrestart.io/checkpoint-interval": INTERVAL, "hotrestart.io/checkpoint-timeout": "60s"}
    env = {"MEMHOG_CHURN": str(CHURN)}
    progress(f"{mib} MiB: first periodic checkpoint")
    pod, cid = memhog_pod(cri, inst, "hotrestart", name, memhog, [str(mib)], env=env, annotations=annotations)
    cri.start_container(cid)
    wait_for_line(cri, cid, lambda x: x.startswith("ready"))
    n = log_rows(cri, cid)[-1][0] if log_rows(cri, cid) else 0
    periodic = wait_manifest(inst.store, name, "periodic")
    r["periodic_dump"] = periodic["timings"]["dump"]
    r["periodic_durable"] = periodic["timings"]["durable"]
    r["periodic_frozen"] = frozen_after(cri, cid, n)
    r["periodic_new"] = periodic["new_bytes"]
    progress(f"{mib} MiB: {CHURN}% rewritten, then stopped")
    cri.exec_sync(cid, ["kill", "-USR1", "1"])
    wait_for_line(cri, cid, lambda x: x.startswith("rewrote"))
    time.sleep(0.5)
    before = log_rows(cri, cid)[-1]
    t0 = time.monotonic()
    cri.stop_container(cid, timeout=120)
    r["stop"] = time.monotonic() - t0
    stopped = wait_manifest(inst.store, name, "stop")
    r["durable"] = time.monotonic() - t0
    r["raw"] = sum(f["raw_bytes"] for f in stopped["files"])
    r["stop_new"] = stopped["new_bytes"]
    r["stop_stored"] = sum(f["stored_bytes"] for f in stopped["files"])
    remove_pod(cri, pod)
    r.update(restore_timed(inst, cri, memhog, name, mib, env, before, "lazy"))
    progress(f"{mib} MiB: stopped again, then a full restore")
    timeout = {"hotrestart.io/checkpoint-timeout": "60s"}
    pod, cid = memhog_pod(cri, inst, "hotrestart", name, memhog, [str(mib)], env=env, annotations=timeout)
    cri.start_container(cid)
    wait_for_line(cri, cid, lambda x: x[:1].isdigit())
    time.sleep(0.5)
    again = log_rows(cri, cid)[-1]
    cri.stop_container(cid, timeout=120)
    wait_manifest(inst.store, name, "stop")
    remove_pod(cri, pod)
    r.update(restore_timed(inst, cri, memhog, name, mib, env, again, "full"))
    progress(f"{mib} MiB: plain runc checkpoint and restore")
    bench_plain_runc(inst, memhog, mib, r)
    return r


def restore_timed(
    inst: ContainerdInstance, cri, memhog: Path, name: str, mib: int, env: dict, before: tuple, mode: str
) -> dict[str, float]:
    """Create and start `name` again from its checkpoint (`hotrestart.io/restore: mode`):
    until StartContainer returns, until the process answers ("resumed", printed by a thread
    that touches none of the buffer), until it prints its checksum over all of its memory,
    and, lazily, until the shim reports every page back."""
    r: dict[str, float] = {}
    progress(f"{mib} MiB: {mode} restore")
    annotations = {"hotrestart.io/restore": mode}
    pod, cid = memhog_pod(cri, inst, "hotrestart", name, memhog, [str(mib)], env=env, annotations=annotations)
    t0 = time.monotonic()
    cri.start_container(cid)
    r[f"{mode}_started"] = time.monotonic() - t0
    progress(f"{mib} MiB: {mode} restore: started after {r[f'{mode}_started']:.2f}s")
    # The shim's own account of the part before `runc restore`, for a slow start to be told apart.
    ready = re.search(rf"{cid}: checkpoint \S+ ready \((\w+), verify ([0-9.]+)s, apply ([0-9.]+)s\)", inst.read_log())
    if ready is not None:
        progress(f"{mib} MiB: {mode} restore: {ready.group(1)}, verify {ready.group(2)}s, apply {ready.group(3)}s")
    wait_for_line(cri, cid, lambda x: x.startswith("resumed"))
    r[f"{mode}_answers"] = time.monotonic() - t0
    progress(f"{mib} MiB: {mode} restore: answers after {r[f'{mode}_answers']:.2f}s")
    row = wait_for_line(cri, cid, lambda x: x[:1].isdigit() and int(x.split()[0]) > before[0])
    r[f"{mode}_all_memory"] = time.monotonic() - t0
    if int(row.split()[1]) != before[1]:
        raise SystemExit(f"restore lost the memory: {before} then {row}")
    if mode == "lazy":
        pattern = re.compile(rf"{cid}: fully resident ([0-9.]+)s after the restore began")
        deadline = time.monotonic() + 120  # the last rows can come before the daemon is done
        while (found := pattern.search(inst.read_log())) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if found is None:
            said = [line[-300:] for line in inst.read_log().splitlines() if cid in line and "shim=hotrestart" in line]
            raise SystemExit(f"the {mib} MiB restore was not lazy:\n" + "\n".join(said[-10:]))
        r["lazy_resident"] = float(found.group(1))
    cri.stop_container(cid, timeout=0)
    remove_pod(cri, pod)
    return r


def bench_dedup(inst: ContainerdInstance, cri, memhog: Path, pods: int = 10, mib: int = 1024) -> dict[str, float]:
    """`pods` pods holding the same `mib` MiB, each stopped to a checkpoint: the store's growth."""
    r: dict[str, float] = {"pods": pods, "mib": mib}
    grown_from = chunk_bytes(inst.store)
    raw = 0
    for i in range(pods):
        progress(f"same data: pod {i + 1} of {pods}")
        name = f"same-{i}"
        pod, cid = memhog_pod(cri, inst, "hotrestart", name, memhog, [str(mib)], env={"MEMHOG_SEED": "42"})
        cri.start_container(cid)
        wait_for_line(cri, cid, lambda x: x[:1].isdigit())
        cri.stop_container(cid, timeout=120)
        raw += sum(f["raw_bytes"] for f in wait_manifest(inst.store, name, "stop")["files"])
        remove_pod(cri, pod)
    r["growth"] = chunk_bytes(inst.store) - grown_from
    r["raw"] = raw
    return r


def bench_scale(
    inst: ContainerdInstance, cri, sizes: list[int]
) -> tuple[dict[int, dict[str, float]], dict[str, float]]:
    memhog = build_memhog(inst.dir)
    # A VM's host backs guest memory on first touch, at about 200 MB/s here: touch what the
    # largest size needs (the container, its images, the restore) once, so that neither side
    # of a comparison pays that.
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 20
    warm = min(max(sizes) * 4, available - 2048)
    progress(f"warming {warm} MiB of the machine's memory")
    subprocess.run([str(memhog), str(warm), "0", "once"], check=True, stdout=subprocess.DEVNULL)
    by_size = {}
    for mib in sizes:
        by_size[mib] = bench_scale_size(inst, cri, memhog, mib)
        progress(f"{mib} MiB: {json.dumps(by_size[mib])}")
    return by_size, bench_dedup(inst, cri, memhog)


def print_scale(by_size: dict[int, dict[str, float]], dedup: dict[str, float]) -> None:
    gib = 1 << 30
    sizes = sorted(by_size)
    print(f"\nCheckpoint cost against memory: {CHURN}% rewritten since the last periodic checkpoint, then stopped:\n")
    print("| measure | " + " | ".join(f"{m} MiB" for m in sizes) + " |")
    print("|---|" + "---|" * len(sizes))

    def row(label: str, cell) -> None:
        print(f"| {label} | " + " | ".join(cell(by_size[m]) for m in sizes) + " |")

    row("stop: signal to exit reported (s)", lambda r: f"{r['stop']:.2f}")
    row("bytes the stop wrote to the store / raw memory", lambda r: f"{r['stop_new'] / r['raw']:.3f}")
    row("stored size of the stop's checkpoint, shared chunks included (GiB)", lambda r: f"{r['stop_stored'] / gib:.2f}")
    row(
        "durable (s), vs plain `runc checkpoint` + fsync",
        lambda r: (
            f"{r['durable']:.2f} vs {r['runc_checkpoint_durable']:.2f} "
            f"({r['durable'] / r['runc_checkpoint_durable']:.2f}x)"
        ),
    )
    row(
        "periodic checkpoint: application frozen (s), vs plain `--leave-running`",
        lambda r: (
            f"{r['periodic_frozen']:.2f} vs {r['runc_leave_running_frozen']:.2f} "
            f"({r['periodic_frozen'] / max(r['runc_leave_running_frozen'], 1e-3):.2f}x)"
        ),
    )
    row("periodic checkpoint: dump / durable (s)", lambda r: f"{r['periodic_dump']:.2f} / {r['periodic_durable']:.2f}")
    row("restore, lazy: StartContainer returns (s)", lambda r: f"{r['lazy_started']:.2f}")
    row(
        "restore, lazy: the process answers (s), vs plain `runc restore`",
        lambda r: f"{r['lazy_answers']:.2f} vs {r['runc_restore']:.2f} ({r['lazy_answers'] / r['runc_restore']:.2f}x)",
    )
    row(
        "restore, lazy: fully resident (s), vs plain `runc restore`",
        lambda r: (
            f"{r['lazy_resident']:.2f} vs {r['runc_restore']:.2f} ({r['lazy_resident'] / r['runc_restore']:.2f}x)"
        ),
    )
    row(
        "restore, full: the process answers (s), vs plain `runc restore`",
        lambda r: f"{r['full_answers']:.2f} vs {r['runc_restore']:.2f} ({r['full_answers'] / r['runc_restore']:.2f}x)",
    )
    row(
        "restore: checksum over all memory printed, lazy / full (s)",
        lambda r: f"{r['lazy_all_memory']:.2f} / {r['full_all_memory']:.2f}",
    )
    if len(sizes) > 1:
        lo, hi = by_size[sizes[0]], by_size[sizes[-1]]
        k = sizes[-1] / sizes[0]
        print(f"\nGrowth from {sizes[0]} to {sizes[-1]} MiB ({k:.0f}x the memory):")
        for key, label in (
            ("stop", "stop"),
            ("durable", "durable"),
            ("lazy_answers", "lazy restore until the process answers"),
            ("lazy_resident", "lazy restore until fully resident"),
            ("full_answers", "full restore until the process answers"),
        ):
            print(f"- {label}: {hi[key] / lo[key]:.2f}x")
    print(
        f"\n{dedup['pods']:.0f} pods holding the same {dedup['mib']:.0f} MiB, each checkpointed: the store grew by "
        f"{dedup['growth'] / gib:.2f} GiB for {dedup['raw'] / gib:.2f} GiB of raw images."
    )
