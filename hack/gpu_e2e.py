#!/usr/bin/env python3
"""GPU checkpoint and restore through the shim's own GPU code, on a machine with a GPU.

Run by hack/gpu-e2e.sh. A workload (PyTorch) fills GPU memory with a known pattern and keeps
computing; the shim's GpuState finds it (NVML and libcuda.so maps), locks and checkpoints
its GPU state with cuda-checkpoint, CRIU dumps it, the original is killed, CRIU restores it,
GpuState resumes it on the restored pid, and the workload verifies the pattern and goes on.
Prints each phase's time and the GPU state's GB/s next to the PCIe bound.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "shim"))

from hotrestart.gpu.inventory import node_inventory  # noqa: E402
from hotrestart.gpu.state import GpuState  # noqa: E402
from hotrestart.reaper import Reaper  # noqa: E402
from hotrestart.runtime.command import CommandRunner  # noqa: E402

WORKLOAD = r"""
import os, sys, time, torch
gib = float(sys.argv[1]); status = sys.argv[2]
n = int(gib * (1 << 30) // 4)
g = torch.Generator(device="cuda").manual_seed(1234)
x = torch.randint(0, 1 << 20, (n,), device="cuda", dtype=torch.int32, generator=g)
want = int(x.sum(dtype=torch.int64))
step = 0
while True:
    got = int(x.sum(dtype=torch.int64))
    step += 1
    tmp = status + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{step} {want} {got}\n")
    os.replace(tmp, status)
    time.sleep(0.2)
"""

PCIE_GBPS = {"5": 63.0, "4": 31.5, "3": 15.75}  # x16, one direction


def read_status(path: Path) -> tuple[int, int, int]:
    try:
        step, want, got = (int(v) for v in path.read_text().split())
        return step, want, got
    except (OSError, ValueError):
        return 0, 0, 0


def wait_steps(
    path: Path, beyond: int, timeout: float, alive: subprocess.Popen[bytes] | None = None
) -> tuple[int, int, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and alive.poll() is not None:
            log = (path.parent / "workload.log").read_text()
            raise SystemExit(f"the workload exited ({alive.returncode}):\n{log[-2000:]}")
        s = read_status(path)
        if s[0] > beyond:
            return s
        time.sleep(0.05)
    raise SystemExit(f"the workload did not progress past step {beyond}")


def pcie_bound() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=pcie.link.gen.current,pcie.link.width.current", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\n")[0]
        gen, width = (v.strip() for v in out.split(","))
        return f"{PCIE_GBPS.get(gen, 0) * int(width) / 16:.1f} GB/s (PCIe gen{gen} x{width})"
    except (OSError, ValueError, subprocess.CalledProcessError):
        return "unknown"


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--gib", type=float, default=8.0, help="GPU memory the workload fills")
    p.add_argument("--criu", default=shutil.which("criu") or "criu")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hotrestart-gpu-e2e-"))
    status = work / "status"
    images = work / "images"
    images.mkdir()
    log = os.open(work / "workload.log", os.O_WRONLY | os.O_CREAT, 0o600)
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKLOAD, str(args.gib), str(status)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    pid = proc.pid
    reaper = Reaper()
    reaper.install(asyncio.get_running_loop())
    gpu = GpuState(CommandRunner(reaper), criu_binary=args.criu)
    r: dict[str, float] = {}
    try:
        step, want, got = wait_steps(status, 0, 300, proc)
        assert want == got, "the workload's pattern is wrong before any checkpoint"
        inventory = node_inventory()
        print(f"workload pid {pid}: {args.gib:.1f} GiB on the GPU; owner of GPU state: {gpu.owner()}")
        if inventory:
            print(f"driver {inventory.driver}; GPUs: {', '.join(d.name for d in inventory.devices)}")
        suspension = await gpu.find([pid])
        if suspension is None:
            raise SystemExit("the shim did not find the workload's GPU state")
        t0 = time.monotonic()
        await gpu.suspend(suspension)
        r["suspend"] = time.monotonic() - t0
        t0 = time.monotonic()
        dump = [args.criu, "dump", "-t", str(pid), "-D", str(images), "--shell-job", "--file-locks"]
        subprocess.run([*dump, "--tcp-established", "--ext-unix-sk", "-v2", "-o", "dump.log"], check=True)
        r["dump"] = time.monotonic() - t0  # the process is gone now
        size = sum(f.stat().st_size for f in images.iterdir())
        t0 = time.monotonic()
        restore = [args.criu, "restore", "-D", str(images), "--shell-job", "--file-locks", "--tcp-close"]
        subprocess.run([*restore, "--ext-unix-sk", "--restore-detached", "-v2", "-o", "restore.log"], check=True)
        r["restore"] = time.monotonic() - t0
        t0 = time.monotonic()
        resumed = await gpu.after_restore([pid])
        r["resume"] = time.monotonic() - t0
        if pid not in resumed:
            raise SystemExit("the restored workload was not resumed on the GPU")
        after = wait_steps(status, step, 120)
        if after[1:] != (want, want):
            raise SystemExit(f"GPU memory differs after restore: {after}")
        gb = args.gib * (1 << 30) / 1e9
        print(
            f"checkpoint: GPU state to host {r['suspend']:.2f} s ({gb / r['suspend']:.1f} GB/s), "
            f"CRIU dump {r['dump']:.2f} s"
        )
        print(
            f"restore:    CRIU restore {r['restore']:.2f} s, GPU state back {r['resume']:.2f} s "
            f"({gb / r['resume']:.1f} GB/s)"
        )
        print(f"images: {size / 1e9:.2f} GB; PCIe bound {pcie_bound()}")
        print(f"verified: step {after[0]}, checksum {after[2]} (pattern intact, still computing)")
        return 0
    finally:
        try:
            os.kill(pid, signal.SIGKILL)  # the restored workload (or the original after a failure)
        except ProcessLookupError:
            pass
        print(f"(work folder {work}: images, dump.log, restore.log, workload.log)")


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
