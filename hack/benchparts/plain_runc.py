"""Plain `runc checkpoint` and `runc restore` of the workload, on a bundle of our own: the reference."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from testbed import BIN_DIR, ContainerdInstance

from .memhog import rows
from .progress import progress


def tree_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


def bench_plain_runc(inst: ContainerdInstance, memhog: Path, mib: int, r: dict[str, float]) -> None:
    """Run, checkpoint (leaving it running, then to disk, fsynced) and restore; times into `r`."""
    drop_caches = Path("/proc/sys/vm/drop_caches")
    bundle = inst.dir / "plain-bundle"
    shutil.rmtree(bundle, ignore_errors=True)  # from an earlier size in the same run
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
