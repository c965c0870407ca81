"""The test bed's object store (hack/object-store.sh): a single-node Ceph with its RADOS Gateway."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "object-store.sh"
DATA = Path(os.environ.get("HOTRESTART_OBJSTORE_DIR", "/var/lib/hotrestart-objstore"))


class ObjectStoreError(RuntimeError):
    pass


def _parse(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))


def running_env() -> dict[str, str] | None:
    """The S3 environment of a cluster that is up, or None."""
    done = subprocess.run(["bash", str(SCRIPT), "env"], capture_output=True, text=True)
    return _parse(done.stdout) if done.returncode == 0 else None


def up(timeout: float = 900) -> dict[str, str]:
    """Start the cluster (installing Ceph's packages when missing); its S3 environment."""
    done = subprocess.run(["bash", str(SCRIPT), "up"], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise ObjectStoreError(f"hack/object-store.sh up failed:\n{done.stderr[-4000:]}")
    return _parse(done.stdout)


def down() -> None:
    subprocess.run(["bash", str(SCRIPT), "down"], capture_output=True, timeout=300)


def gateway_pid() -> int:
    return int((DATA / "run" / "client.rgw.x.pid").read_text().strip())
