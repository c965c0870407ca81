#!/usr/bin/env python3
"""`make bench`: the shim against containerd's runc-v2 shim, side by side in one run.

Measures, on one private containerd 2.x (the test bed):
- pod start latency: RunPodSandbox + CreateContainer + StartContainer, median of
  alternating runs (runc, hotrestart, runc, ...), after one warm-up pod each;
- idle shim memory: PSS of the shim processes per pod, with N pods of each handler idle
  at once. For hotrestart the node-wide zygote is reported separately and also amortised
  over the N pods, since it is a per-node cost.
Absolute times on shared machines are noisy; the ratios are the result.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

from testbed import BUSYBOX_IMAGE, ContainerdInstance, host  # noqa: E402
from testbed.pods import make_pod_config  # noqa: E402

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


def shim_pids(inst: ContainerdInstance, handler: str) -> list[int]:
    name = "containerd-shim-runc-v2" if handler == "runc" else "hotrestart"
    return [p.pid for p in inst.shim_processes() if any(name in a for a in p.cmdline)]


def zygote_pid(inst: ContainerdInstance) -> int | None:
    holders = host.socket_holders(inst.zygote_socket, [p.pid for p in host.processes()])
    return min(holders) if holders else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10, help="timed pod starts per handler")
    parser.add_argument("--pods", type=int, default=10, help="idle pods per handler for the memory figure")
    args = parser.parse_args()
    shim_dir = Path(sys.executable).parent
    with ContainerdInstance(shim_bin_dir=shim_dir) as inst:
        cri = inst.cri()
        tmp = inst.dir / "bench-pods"
        for handler in HANDLERS:  # warm-up: images, CNI, the zygote
            pod, _ = start_pod(cri, inst, tmp, handler, "warm")
            remove_pod(cri, pod)
        times: dict[str, list[float]] = {h: [] for h in HANDLERS}
        for i in range(args.runs):
            for handler in HANDLERS if i % 2 == 0 else reversed(HANDLERS):
                pod, took = start_pod(cri, inst, tmp, handler, f"lat{i}")
                times[handler].append(took)
                remove_pod(cri, pod)

        memory: dict[str, float] = {}
        zygote_kib = 0
        for handler in HANDLERS:
            pods = [start_pod(cri, inst, tmp, handler, f"mem{i}")[0] for i in range(args.pods)]
            time.sleep(2)  # idle
            pids = shim_pids(inst, handler)
            memory[handler] = sum(pss_kib(p) for p in pids) / len(pods)
            if handler == "hotrestart":
                zpid = zygote_pid(inst)
                zygote_kib = pss_kib(zpid) if zpid else 0
            print(f"{handler}: {len(pids)} shim processes for {len(pods)} pods", file=sys.stderr)
            for pod in pods:
                remove_pod(cri, pod)
        cri.close()

    med = {h: statistics.median(v) * 1000 for h, v in times.items()}
    amortised = memory["hotrestart"] + zygote_kib / args.pods
    print(f"containerd {inst.major}.x, {os.cpu_count()} CPUs, {args.runs} alternating runs, {args.pods} idle pods\n")
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
        f"| same, zygote amortised over {args.pods} pods (MiB) | {memory['runc'] / 1024:.1f} | "
        f"{amortised / 1024:.1f} | {amortised / memory['runc']:.2f}x |"
    )
    print(f"\nzygote PSS (once per node): {zygote_kib / 1024:.1f} MiB")
    for h in HANDLERS:
        print(f"{h} start times (ms): " + " ".join(f"{t * 1000:.0f}" for t in times[h]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
