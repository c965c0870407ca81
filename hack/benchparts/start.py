"""Pod start latency and idle shim memory, runc-v2 against hotrestart."""

from __future__ import annotations

import os
import statistics
import time

from testbed import ContainerdInstance, host

from .pods import remove_pod, start_pod

HANDLERS = ("runc", "hotrestart")


def pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def shim_pids(inst: ContainerdInstance, handler: str) -> list[int]:
    name = "containerd-shim-runc-v2" if handler == "runc" else "hotrestart"
    return [p.pid for p in inst.shim_processes() if any(name in a for a in p.cmdline)]


def zygote_pid(inst: ContainerdInstance) -> int | None:
    holders = host.socket_holders(inst.zygote_socket, [p.pid for p in host.processes()])
    return min(holders) if holders else None


def bench_start_and_memory(inst: ContainerdInstance, cri, runs: int, pods_n: int) -> None:
    tmp = inst.dir / "bench-pods"
    for handler in HANDLERS:  # warm-up: images, CNI, the zygote
        pod, _ = start_pod(cri, inst, tmp, handler, "warm")
        remove_pod(cri, pod)
    times: dict[str, list[float]] = {h: [] for h in HANDLERS}
    for i in range(runs):
        for handler in HANDLERS if i % 2 == 0 else reversed(HANDLERS):
            pod, took = start_pod(cri, inst, tmp, handler, f"lat{i}")
            times[handler].append(took)
            remove_pod(cri, pod)
    memory: dict[str, float] = {}
    zygote_kib = 0
    for handler in HANDLERS:
        pods = [start_pod(cri, inst, tmp, handler, f"mem{i}")[0] for i in range(pods_n)]
        time.sleep(2)  # idle
        pids = shim_pids(inst, handler)
        memory[handler] = sum(pss_kib(p) for p in pids) / len(pods)
        if handler == "hotrestart":
            zpid = zygote_pid(inst)
            zygote_kib = pss_kib(zpid) if zpid else 0
        for pod in pods:
            remove_pod(cri, pod)
    med = {h: statistics.median(v) * 1000 for h, v in times.items()}
    amortised = memory["hotrestart"] + zygote_kib / pods_n
    print(f"containerd {inst.major}.x, {os.cpu_count()} CPUs, {runs} alternating runs, {pods_n} idle pods\n")
    print("| measure | runc-v2 | hotrestart | ratio |")
    print("|---|---|---|---|")
    print(
        f"| pod start, median (ms) | {med['runc']:.0f} | {med['hotrestart']:.0f} | "
        f"{med['hotrestart'] / med['runc']:.2f}x |"
    )
    print(
        f"| shim PSS per pod (MiB) | {memory['runc'] / 1024:.1f} | {memory['hotrestart'] / 1024:.1f} | "
        f"{memory['hotrestart'] / memory['runc']:.2f}x |"
    )
    print(
        f"| same, zygote amortised over {pods_n} pods (MiB) | {memory['runc'] / 1024:.1f} | "
        f"{amortised / 1024:.1f} | {amortised / memory['runc']:.2f}x |"
    )
    print(f"\nzygote PSS (once per node): {zygote_kib / 1024:.1f} MiB")
    for h in HANDLERS:
        print(f"{h} start times (ms): " + " ".join(f"{t * 1000:.0f}" for t in times[h]))
