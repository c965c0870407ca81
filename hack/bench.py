#!/usr/bin/env python3
"""`make bench`: the shim against containerd's runc-v2 shim and plain runc, in one run.

Measures, on one private containerd 2.x (the test bed):
- pod start latency: RunPodSandbox + CreateContainer + StartContainer, median of
  alternating runs (runc, hotrestart, runc, ...), after one warm-up pod each;
- idle shim memory: PSS of the shim processes per pod, with N pods of each handler idle
  at once. For hotrestart the node-wide zygote is reported separately and also amortised
  over the N pods, since it is a per-node cost;
- hot restart of a container holding 1 GiB of half-compressible memory (hack/memhog.c):
  stop time (StopContainer until the exit is reported), time until the checkpoint is
  durable in the store, its size, and the time StartContainer takes to have the process
  running again; against plain `runc checkpoint` (to disk, fsynced) and `runc restore`
  of the same workload, containerd's CRI CheckpointContainer with runc-v2, and a cold
  start of the same service with a slow start;
- checkpoints that leave the container running: how long the application is frozen by a
  periodic checkpoint (memhog reports its longest stop) against plain
  `runc checkpoint --leave-running` to disk, and CRI CheckpointContainer through the shim
  against the same call on runc-v2.
Absolute times on shared machines are noisy; the ratios are the result.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from cri import parse_cri_log
from testbed import BIN_DIR, BUSYBOX_IMAGE, ContainerdInstance, host
from testbed.pods import make_pod_config

ROOT = Path(__file__).resolve().parent.parent


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


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_memhog(dest: Path) -> Path:
    binary = dest / "memhog"
    source = str(ROOT / "hack" / "memhog.c")
    subprocess.run(["gcc", "-static", "-O2", "-pthread", "-o", str(binary), source], check=True)
    return binary


def wait_for_line(cri, cid: str, predicate, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in (x.message for x in parse_cri_log(cri.read_log(cid))):
            if predicate(line):
                return line
        time.sleep(0.05)
    raise TimeoutError(f"no matching line in the log of {cid}")


def memhog_pod(cri, inst, handler: str, name: str, memhog: Path, args: list[str], **kw: Any) -> tuple[str, str]:
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


def tree_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


def bench_hot_restart(inst: ContainerdInstance, cri, mib: int, warmup: float) -> dict[str, float]:
    memhog = build_memhog(inst.dir)
    # On a VM, memory the guest never touched is slow the first time (the host backs it on
    # demand); touch plenty once so neither side of a comparison pays that.
    progress("warming the machine's memory")
    subprocess.run([str(memhog), str(min(8192, mib * 6)), "0", "once"], check=True, stdout=subprocess.DEVNULL)
    r: dict[str, float] = {}
    drop_caches = Path("/proc/sys/vm/drop_caches")

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
    bundle = inst.dir / "plain-bundle"
    rootfs = bundle / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    for d in ("proc", "sys", "dev", "tmp"):
        (rootfs / d).mkdir()
    shutil.copy(memhog, rootfs / "memhog")
    runc = str(BIN_DIR / "runc")
    root = str(inst.dir / "plain-runc")
    env = dict(os.environ, PATH=f"{BIN_DIR}:{os.environ.get('PATH', '')}")  # runc finds criu on PATH
    subprocess.run([runc, "spec", "--bundle", str(bundle)], check=True)
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"].update(args=["/memhog", str(mib)], terminal=False)
    (bundle / "config.json").write_text(json.dumps(spec))
    cid = f"plain-{uuid.uuid4().hex[:8]}"
    images = inst.dir / "plain-images"
    output = bytearray()
    try:
        # A pipe, not a file, for stdout: CRIU cannot dump a file outside the container.
        run = subprocess.Popen(
            [runc, "--root", root, "run", "-d", "--bundle", str(bundle), cid],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        assert run.stdout is not None

        def drain(stream: Any) -> None:
            while chunk := stream.read1(65536):
                output.extend(chunk)

        threading.Thread(target=drain, args=(run.stdout,), daemon=True).start()
        if run.wait() != 0:
            raise SystemExit("runc run failed")
        while b"\n3 " not in output:
            time.sleep(0.05)
        progress("plain runc: checkpoint --leave-running")
        seen = len(rows(output.decode(errors="replace").splitlines()))
        running_images = inst.dir / "plain-running-images"
        t0 = time.monotonic()
        subprocess.run(
            [runc, "--root", root, "checkpoint", "--leave-running", "--image-path", str(running_images), cid],
            check=True,
            env=env,
        )
        r["runc_leave_running"] = time.monotonic() - t0
        time.sleep(1.5)
        r["runc_leave_running_frozen"] = (
            max((stall for _, _, stall in rows(output.decode(errors="replace").splitlines())[seen:]), default=0) / 1000
        )
        shutil.rmtree(running_images, ignore_errors=True)
        progress("plain runc: checkpoint")
        t0 = time.monotonic()
        subprocess.run([runc, "--root", root, "checkpoint", "--image-path", str(images), cid], check=True, env=env)
        r["runc_checkpoint"] = time.monotonic() - t0
        fsync_tree(images)
        r["runc_checkpoint_durable"] = time.monotonic() - t0
        r["runc_size"] = tree_size(images)
        if drop_caches.exists():
            # Fair to both: each restore reads its images from a cold cache.
            subprocess.run(["sync"], check=True)
            drop_caches.write_text("3")
        progress("plain runc: restore")
        t0 = time.monotonic()
        restore = subprocess.Popen(
            [runc, "--root", root, "restore", "-d", "--image-path", str(images), "--bundle", str(bundle), cid],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        assert restore.stdout is not None
        threading.Thread(target=drain, args=(restore.stdout,), daemon=True).start()
        if restore.wait() != 0:
            raise SystemExit("plain runc restore failed")
        r["runc_restore"] = time.monotonic() - t0
    finally:
        subprocess.run([runc, "--root", root, "kill", cid, "KILL"], check=False, env=env, capture_output=True)
        time.sleep(0.3)
        subprocess.run([runc, "--root", root, "delete", "--force", cid], check=False, env=env, capture_output=True)
    shutil.rmtree(images, ignore_errors=True)
    return r


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


def bench_store_key(inst: ContainerdInstance, cri, mib: int, rounds: int) -> None:
    """Durable and restore times with a store key (sealed checkpoints) against without, in
    alternating rounds on two containerds of the same build."""
    key = inst.dir / "store-key"
    key.write_text(f"bench:{base64.b64encode(os.urandom(32)).decode()}\n")
    key.chmod(0o600)
    memhog = build_memhog(inst.dir)
    plain: list[dict[str, float]] = []
    sealed: list[dict[str, float]] = []
    with ContainerdInstance(shim_bin_dir=Path(sys.executable).parent, env={"HOTRESTART_STORE_KEY": str(key)}) as keyed:
        kcri = keyed.cri()
        for i in range(rounds):
            progress(f"store key: round {i + 1} of {rounds}")
            # Each side goes first in every other round: the second of a pair runs on a
            # machine the first has just churned.
            pair = [
                (plain, lambda i=i: hot_cycle(inst, cri, memhog, mib, f"plain-{i}")),
                (sealed, lambda i=i: hot_cycle(keyed, kcri, memhog, mib, f"sealed-{i}")),
            ]
            for results, run in pair if i % 2 == 0 else reversed(pair):
                results.append(run())
        kcri.close()
    print(f"\n### Store key ({mib} MiB, median of {rounds} alternating rounds)\n")
    print("| | without a key | with a key | ratio |\n|---|---|---|---|")
    for label, at in (
        ("checkpoint durable after the stop (s)", "durable"),
        ("StartContainer to running again (s)", "restore"),
    ):
        a = statistics.median(r[at] for r in plain)
        b = statistics.median(r[at] for r in sealed)
        print(f"| {label} | {a:.2f} | {b:.2f} | {b / a:.2f}x |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10, help="timed pod starts per handler")
    parser.add_argument("--pods", type=int, default=10, help="idle pods per handler for the memory figure")
    parser.add_argument("--mib", type=int, default=1024, help="memory of the hot-restart workload")
    parser.add_argument("--warmup", type=float, default=10.0, help="warm-up of the cold-start comparison (s)")
    parser.add_argument("--only", choices=("start", "checkpoint", "key"), help="run one part only")
    parser.add_argument("--key-rounds", type=int, default=3, help="rounds of the store key comparison")
    args = parser.parse_args()
    with ContainerdInstance(shim_bin_dir=Path(sys.executable).parent) as inst:
        cri = inst.cri()
        if args.only in (None, "start"):
            bench_start_and_memory(inst, cri, args.runs, args.pods)
        if args.only in (None, "checkpoint"):
            r = bench_hot_restart(inst, cri, args.mib, args.warmup)
            bench_running(inst, cri, args.mib, r)
            print_hot_restart(r, args.mib, args.warmup)
            print_running(r, args.mib)
        if args.only in (None, "key"):
            bench_store_key(inst, cri, args.mib, args.key_rounds)
        cri.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
