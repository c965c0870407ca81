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
- the same stop, durable and restore through an S3 object store (the test bed's Ceph RADOS
  Gateway, hack/object-store.sh) against the directory store;
- checkpoints that leave the container running: how long the application is frozen by a
  periodic checkpoint (memhog reports its longest stop) against plain
  `runc checkpoint --leave-running` to disk, and CRI CheckpointContainer through the shim
  against the same call on runc-v2.
Absolute times on shared machines are noisy; the ratios are the result.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tarfile
import tempfile
from pathlib import Path

from benchparts.hot_restart import bench_hot_restart, print_hot_restart
from benchparts.object_store import bench_object_store
from benchparts.running import bench_running, print_running
from benchparts.scale import bench_scale, print_scale
from benchparts.start import bench_start_and_memory
from benchparts.store_key import bench_store_key
from benchparts.workloads import bench_workloads
from testbed import ContainerdInstance


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10, help="timed pod starts per handler")
    parser.add_argument("--pods", type=int, default=10, help="idle pods per handler for the memory figure")
    parser.add_argument("--mib", type=int, default=1024, help="memory of the hot-restart workload")
    parser.add_argument("--warmup", type=float, default=10.0, help="warm-up of the cold-start comparison (s)")
    parser.add_argument(
        "--only",
        choices=("start", "checkpoint", "key", "workloads", "scale", "objstore"),
        help="run one part only",
    )
    parser.add_argument("--objstore-rounds", type=int, default=3, help="rounds of the object store comparison")
    parser.add_argument("--key-rounds", type=int, default=3, help="rounds of the store key comparison")
    parser.add_argument(
        "--scale-sizes",
        type=lambda t: [int(x) for x in t.split(",")],
        default=[1024, 4096],
        help="memory sizes (MiB) of the scale part, comma-separated (8192 where memory allows)",
    )
    parser.add_argument(
        "--bundle",
        type=Path,
        help="measure the shim of a node bundle (make dist: its tar.gz or an unpacked tree) instead of this venv's",
    )
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        shims = Path(sys.executable).parent
        if args.bundle:
            shims = unpacked(args.bundle, Path(stack.enter_context(tempfile.TemporaryDirectory()))) / "bin"
            print(f"shim: {shims}/containerd-shim-hotrestart-v2 (node bundle)")
        inst = stack.enter_context(ContainerdInstance(shim_bin_dir=shims))
        run(inst, args)
    return 0


def unpacked(bundle: Path, scratch: Path) -> Path:
    """The bundle's root: `bundle` itself, or the tarball unpacked below `scratch`."""
    if bundle.is_dir():
        return bundle.resolve()
    with tarfile.open(bundle) as tar:
        tar.extractall(scratch, filter="tar")
    [root] = list(scratch.iterdir())
    return root


def run(inst: ContainerdInstance, args: argparse.Namespace) -> None:
    cri = inst.cri()
    if args.only in (None, "start"):
        bench_start_and_memory(inst, cri, args.runs, args.pods)
    if args.only in (None, "checkpoint"):
        r = bench_hot_restart(inst, cri, args.mib, args.warmup)
        bench_running(inst, cri, args.mib, r)
        print_hot_restart(r, args.mib, args.warmup)
        print_running(r, args.mib)
    if args.only in (None, "workloads"):
        bench_workloads(inst, cri, args.mib // 4, args.warmup)
    if args.only in (None, "key"):
        bench_store_key(inst, cri, args.mib, args.key_rounds)
    if args.only in (None, "objstore"):
        bench_object_store(inst, cri, args.mib, args.objstore_rounds)
    if args.only in (None, "scale"):
        by_size, dedup = bench_scale(inst, cri, args.scale_sizes)
        print_scale(by_size, dedup)
    cri.close()


if __name__ == "__main__":
    sys.exit(main())
