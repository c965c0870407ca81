"""Bringing a started containerd into service: its API answering, the CRI ready, images imported."""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

from . import host
from .errors import TestbedError
from .images import BUSYBOX_IMAGE, PAUSE_IMAGE, build_images

if TYPE_CHECKING:
    from .containerd import ContainerdInstance


def wait_api(inst: ContainerdInstance) -> None:
    """Wait until containerd's gRPC API answers (the CRI's Version)."""
    from cri.client import CRIClient

    deadline = time.monotonic() + inst.start_timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        inst.check_alive("starting")
        if inst.address.exists():
            with CRIClient(inst.address, timeout=2) as c:
                try:
                    c.version(timeout=2)
                    return
                except Exception as e:  # grpc.RpcError, mostly UNAVAILABLE
                    last = e
        time.sleep(0.05)
    raise TestbedError(f"CRI of {inst} did not answer in {inst.start_timeout}s ({last}); log:\n{inst.log_tail()}")


def wait_cri_ready(inst: ContainerdInstance) -> None:
    """Wait until the CRI reports its runtime and network ready."""
    from cri.client import CRIClient

    deadline = time.monotonic() + inst.start_timeout
    conds: dict[str, bool] = {}
    with CRIClient(inst.address, timeout=5) as c:
        while time.monotonic() < deadline:
            inst.check_alive("waiting for the CRI")
            with contextlib.suppress(Exception):
                conds = {x.type: x.status for x in c.status().status.conditions}
                if conds.get("RuntimeReady") and conds.get("NetworkReady"):
                    return
            time.sleep(0.05)
    raise TestbedError(f"CRI of {inst} not ready: {conds}; log:\n{inst.log_tail()}")


def import_images(inst: ContainerdInstance) -> None:
    """Import the test images (built once if none were given) and wait until the CRI sees them."""
    if inst.images_tar is None:
        inst.images_tar = build_images(inst.dir / "images.tar")
    # --local: unpack client-side into the default (overlayfs) snapshotter,
    # the same way on 1.7 and 2.x.
    inst.ctr("images", "import", "--local", str(inst.images_tar))
    from cri.client import CRIClient

    with CRIClient(inst.address, timeout=5) as c:
        ok = host.wait_until(
            lambda: all(c.image_status(ref).id for ref in (BUSYBOX_IMAGE, PAUSE_IMAGE)),
            timeout=30,
            interval=0.1,
        )
    if not ok:
        raise TestbedError(f"the CRI does not see the imported images; log:\n{inst.log_tail()}")
