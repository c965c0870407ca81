"""Turn `runc events --stats` output into containerd's cgroup v1 Metrics message.

runc already reads every cgroup file; we only rename. The field mapping follows what
containerd's runc shim reports, so CRI ContainerStats (usage, working set, CPU) match.
"""

from __future__ import annotations

from typing import Any

from hotrestart.api.io.containerd.cgroups.v1 import metrics_pb2

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
