"""The host's memory, as the kernel reports it in /proc/meminfo."""

from __future__ import annotations


def available(path: str = "/proc/meminfo") -> int:
    """MemAvailable of this host, in bytes (0 when unknown)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0
