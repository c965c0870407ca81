"""flock-based ownership: an instance's directory, and the network slots instances share."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .errors import TestbedError
from .layout import LOCK_DIR, MAX_NET_SLOTS


def lock_file(path: Path, blocking: bool) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BaseException:
        os.close(fd)
        raise
    return fd


def net_slot_lock(slot: int) -> Path:
    return LOCK_DIR / f"net{slot}.lock"


def claim_net_slot() -> tuple[int, int]:
    """The lowest free network slot, locked: (slot, lock fd)."""
    LOCK_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    for slot in range(MAX_NET_SLOTS):
        try:
            fd = lock_file(net_slot_lock(slot), blocking=False)
        except BlockingIOError:
            continue
        return slot, fd
    raise TestbedError(f"all {MAX_NET_SLOTS} test bed network slots are in use")
