"""Turn `runc events --stats` output into containerd's cgroup Metrics message: v1 on a node
with v1 hierarchies (hybrid included), v2 on a node with the unified hierarchy only, as
containerd's runc shim decides (the CRI computes the working set from either).

runc already reads every cgroup file; we only rename, and on v2 add memory.events, which
runc does not report. The field mapping follows what containerd's runc shim reports, so CRI
ContainerStats (usage, working set, CPU) match.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from google.protobuf.message import Message

from hotrestart.api.io.containerd.cgroups.v1 import metrics_pb2
from hotrestart.api.io.containerd.cgroups.v2 import metrics_pb2 as metrics_v2_pb2
from hotrestart.runtime import cgroups

_NO_LIMIT = (1 << 64) - 1  # runc's (and containerd's) "max"

_BLKIO = {
    "ioServiceBytesRecursive": "io_service_bytes_recursive",
    "ioServicedRecursive": "io_serviced_recursive",
    "ioQueueRecursive": "io_queued_recursive",
    "ioServiceTimeRecursive": "io_service_time_recursive",
    "ioWaitTimeRecursive": "io_wait_time_recursive",
    "ioMergedRecursive": "io_merged_recursive",
    "ioTimeRecursive": "io_time_recursive",
    "sectorsRecursive": "sectors_recursive",
}

# MemoryStat field -> key in memory.stat (runc's "raw").
_RAW = {
    "cache": "cache",
    "rss": "rss",
    "rss_huge": "rss_huge",
    "mapped_file": "mapped_file",
    "dirty": "dirty",
    "writeback": "writeback",
    "pg_pg_in": "pgpgin",
    "pg_pg_out": "pgpgout",
    "pg_fault": "pgfault",
    "pg_maj_fault": "pgmajfault",
    "inactive_anon": "inactive_anon",
    "active_anon": "active_anon",
    "inactive_file": "inactive_file",
    "active_file": "active_file",
    "unevictable": "unevictable",
    "hierarchical_memory_limit": "hierarchical_memory_limit",
    "hierarchical_swap_limit": "hierarchical_memsw_limit",
    "total_cache": "total_cache",
    "total_rss": "total_rss",
    "total_rss_huge": "total_rss_huge",
    "total_mapped_file": "total_mapped_file",
    "total_dirty": "total_dirty",
    "total_writeback": "total_writeback",
    "total_pg_pg_in": "total_pgpgin",
    "total_pg_pg_out": "total_pgpgout",
    "total_pg_fault": "total_pgfault",
    "total_pg_maj_fault": "total_pgmajfault",
    "total_inactive_anon": "total_inactive_anon",
    "total_active_anon": "total_active_anon",
    "total_inactive_file": "total_inactive_file",
    "total_active_file": "total_active_file",
    "total_unevictable": "total_unevictable",
}


def _entry(target: Any, source: dict[str, Any] | None) -> None:
    source = source or {}
    target.limit = int(source.get("limit", 0))
    target.usage = int(source.get("usage", 0))
    target.max = int(source.get("max", 0))
    target.failcnt = int(source.get("failcnt", 0))


def metrics_v1(stats: dict[str, Any]) -> metrics_pb2.Metrics:
    m = metrics_pb2.Metrics()
    cpu = stats.get("cpu") or {}
    usage = cpu.get("usage") or {}
    m.cpu.usage.total = int(usage.get("total", 0))
    m.cpu.usage.kernel = int(usage.get("kernel", 0))
    m.cpu.usage.user = int(usage.get("user", 0))
    m.cpu.usage.per_cpu.extend(int(v) for v in usage.get("percpu") or [])
    throttling = cpu.get("throttling") or {}
    m.cpu.throttling.periods = int(throttling.get("periods", 0))
    m.cpu.throttling.throttled_periods = int(throttling.get("throttled_periods", 0))
    m.cpu.throttling.throttled_time = int(throttling.get("throttled_time", 0))

    memory = stats.get("memory") or {}
    raw = memory.get("raw") or {}
    for field, key in _RAW.items():
        setattr(m.memory, field, int(raw.get(key, 0)))
    _entry(m.memory.usage, memory.get("usage"))
    _entry(m.memory.swap, memory.get("swap"))
    _entry(m.memory.kernel, memory.get("kernel"))
    _entry(m.memory.kernel_tcp, memory.get("kernelTCP"))

    pids = stats.get("pids") or {}
    m.pids.current = int(pids.get("current", 0))
    m.pids.limit = int(pids.get("limit", 0))

    blkio = stats.get("blkio") or {}
    for key, field in _BLKIO.items():
        for item in blkio.get(key) or []:
            entry = getattr(m.blkio, field).add()
            entry.op = str(item.get("op", ""))
            entry.major = int(item.get("major", 0))
            entry.minor = int(item.get("minor", 0))
            entry.value = int(item.get("value", 0))

    for pagesize, h in sorted((stats.get("hugetlb") or {}).items()):
        entry = m.hugetlb.add()
        entry.pagesize = pagesize
        entry.usage = int(h.get("usage", 0))
        entry.max = int(h.get("max", 0))
        entry.failcnt = int(h.get("failcnt", 0))
    return m


# MemoryStat fields that are not memory.stat keys (the rest are, by the same name).
_V2_NOT_RAW = {"usage", "usage_limit", "swap_usage", "swap_limit", "max_usage", "swap_max_usage", "psi"}
_V2_RAW = [f.name for f in metrics_v2_pb2.MemoryStat.DESCRIPTOR.fields if f.name not in _V2_NOT_RAW]
_V2_EVENTS = [f.name for f in metrics_v2_pb2.MemoryEvents.DESCRIPTOR.fields]


def metrics(stats: dict[str, Any], pid: int) -> Message:
    """The Metrics containerd's runc shim would give for the container whose init is `pid`."""
    if not cgroups.unified_host():
        return metrics_v1(stats)
    directory = cgroups.unified_dir(cgroups.of_pid(pid)) if pid > 0 else None
    if directory is None:
        return metrics_v2(stats, {})
    hugetlb_max = {size: limit_of(directory, f"hugetlb.{size}.max") for size in stats.get("hugetlb") or {}}
    return metrics_v2(
        stats, memory_events(directory), swap_limit(directory), limit_of(directory, "pids.max"), hugetlb_max
    )


def swap_limit(directory: str) -> int | None:
    """memory.swap.max of a v2 cgroup ("max": no limit); None when it cannot be read."""
    return limit_of(directory, "memory.swap.max")


def limit_of(directory: str, name: str) -> int | None:
    """A v2 limit file ("max": no limit, as containerd's cgroup2 reads it); None when it cannot
    be read."""
    try:
        with open(os.path.join(directory, name)) as f:
            text = f.read(64).strip()
    except OSError:
        return None
    if text == "max":
        return _NO_LIMIT
    return int(text) if text.isdecimal() else None


def memory_events(directory: str) -> dict[str, int]:
    """memory.events of a v2 cgroup ({} when it cannot be read: the container is gone)."""
    found: dict[str, int] = {}
    with contextlib.suppress(OSError), open(os.path.join(directory, "memory.events")) as f:
        for line in f.read(4096).splitlines():
            key, _, value = line.partition(" ")
            if value.strip().isdecimal():
                found[key] = int(value)
    return found


def metrics_v2(
    stats: dict[str, Any],
    events: dict[str, int],
    swap_max: int | None = None,
    pids_max: int | None = None,
    hugetlb_max: dict[str, int | None] | None = None,
) -> metrics_v2_pb2.Metrics:
    m = metrics_v2_pb2.Metrics()
    cpu = stats.get("cpu") or {}
    usage = cpu.get("usage") or {}
    # runc reports nanoseconds (v1's unit); cpu.stat has microseconds.
    m.cpu.usage_usec = int(usage.get("total", 0)) // 1000
    m.cpu.user_usec = int(usage.get("user", 0)) // 1000
    m.cpu.system_usec = int(usage.get("kernel", 0)) // 1000
    throttling = cpu.get("throttling") or {}
    m.cpu.nr_periods = int(throttling.get("periods", 0))
    m.cpu.nr_throttled = int(throttling.get("throttled_periods", 0))
    m.cpu.throttled_usec = int(throttling.get("throttled_time", 0)) // 1000

    memory = stats.get("memory") or {}
    raw = memory.get("raw") or {}
    for field in _V2_RAW:
        setattr(m.memory, field, int(raw.get(field, 0)))
    current = memory.get("usage") or {}
    m.memory.usage = int(current.get("usage", 0))
    m.memory.usage_limit = int(current.get("limit", 0))
    m.memory.max_usage = int(current.get("max", 0))
    # runc adds memory to swap, as v1's memsw counts them together; v2 reports swap alone.
    swap = memory.get("swap") or {}
    m.memory.swap_usage = max(int(swap.get("usage", 0)) - m.memory.usage, 0)
    if swap_max is not None:  # read from the cgroup: runc's sum cannot be undone past "max"
        m.memory.swap_limit = swap_max
    else:
        summed = int(swap.get("limit", 0))
        m.memory.swap_limit = summed if summed in (0, _NO_LIMIT) else max(summed - m.memory.usage_limit, 0)
    for field in _V2_EVENTS:
        setattr(m.memory_events, field, events.get(field, 0))

    pids = stats.get("pids") or {}
    m.pids.current = int(pids.get("current", 0))
    # runc reports no limit as 0 (v1's way); containerd's cgroup2 gives "max" as 2^64-1.
    m.pids.limit = pids_max if pids_max is not None else int(pids.get("limit", 0))

    # runc turns each io.stat line into Read/Write entries of the v1 lists.
    blkio = stats.get("blkio") or {}
    devices: dict[tuple[int, int], metrics_v2_pb2.IOEntry] = {}
    for key, names in (("ioServiceBytesRecursive", ("rbytes", "wbytes")), ("ioServicedRecursive", ("rios", "wios"))):
        for item in blkio.get(key) or []:
            op = str(item.get("op", "")).lower()
            if op not in ("read", "write"):
                continue
            device = (int(item.get("major", 0)), int(item.get("minor", 0)))
            entry = devices.get(device)
            if entry is None:
                entry = devices[device] = m.io.usage.add(major=device[0], minor=device[1])
            setattr(entry, names[0] if op == "read" else names[1], int(item.get("value", 0)))

    # runc's v2 stats have no hugetlb limit; containerd's cgroup2 reads hugetlb.<size>.max.
    for pagesize, h in sorted((stats.get("hugetlb") or {}).items()):
        limit = (hugetlb_max or {}).get(pagesize)
        m.hugetlb.add(
            pagesize=pagesize,
            current=int(h.get("usage", 0)),
            max=limit if limit is not None else int(h.get("max", 0)),
            failcnt=int(h.get("failcnt", 0)),
        )
    return m
