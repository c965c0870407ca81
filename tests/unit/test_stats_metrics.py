"""Stats replies and OOM notices: runc's figures in the Metrics message containerd's runc shim gives, v1 on a
node with v1 hierarchies, v2 on a node with the unified hierarchy only."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from hotrestart.api.io.containerd.cgroups.v1 import metrics_pb2 as v1
from hotrestart.api.io.containerd.cgroups.v2 import metrics_pb2 as v2
from hotrestart.runtime import cgroups, oom, stats

# What `runc events --stats` prints on a cgroup v2 node (runc 1.3, fs2): v1 units and names,
# memory.stat's v2 keys in "raw", swap counted with memory as v1's memsw.
RUNC_V2 = {
    "cpu": {
        "usage": {"total": 2_500_000, "user": 1_500_000, "kernel": 1_000_000},
        "throttling": {"periods": 10, "throttled_periods": 2, "throttled_time": 7_000},
    },
    "memory": {
        "usage": {"usage": 40 << 20, "limit": 64 << 20, "max": 48 << 20},
        "swap": {"usage": (40 << 20) + (1 << 20), "limit": (64 << 20) + (16 << 20)},
        "raw": {"anon": 30 << 20, "file": 9 << 20, "inactive_file": 4 << 20, "pgfault": 1234, "pgmajfault": 5},
    },
    "pids": {"current": 3, "limit": 100},
    "blkio": {
        "ioServiceBytesRecursive": [
            {"major": 254, "minor": 0, "op": "Read", "value": 4096},
            {"major": 254, "minor": 0, "op": "Write", "value": 8192},
        ],
        "ioServicedRecursive": [
            {"major": 254, "minor": 0, "op": "Read", "value": 1},
            {"major": 254, "minor": 0, "op": "Write", "value": 2},
        ],
    },
    "hugetlb": {"2MB": {"usage": 0, "max": 0}},
}


def test_v2_metrics_take_containerds_units_and_names() -> None:
    m = stats.metrics_v2(RUNC_V2, {"oom": 1, "oom_kill": 1, "max": 4})
    assert (m.cpu.usage_usec, m.cpu.user_usec, m.cpu.system_usec) == (2500, 1500, 1000)
    assert (m.cpu.nr_periods, m.cpu.nr_throttled, m.cpu.throttled_usec) == (10, 2, 7)
    assert (m.memory.usage, m.memory.usage_limit, m.memory.max_usage) == (40 << 20, 64 << 20, 48 << 20)
    # The CRI's working set on v2: usage less inactive_file; its RSS: anon.
    assert (m.memory.inactive_file, m.memory.anon, m.memory.file) == (4 << 20, 30 << 20, 9 << 20)
    assert (m.memory.pgfault, m.memory.pgmajfault) == (1234, 5)
    assert (m.memory.swap_usage, m.memory.swap_limit) == (1 << 20, 16 << 20), "swap alone, as v2 counts it"
    assert (m.memory_events.oom, m.memory_events.oom_kill, m.memory_events.max) == (1, 1, 4)
    assert (m.pids.current, m.pids.limit) == (3, 100)
    [io] = m.io.usage
    assert (io.major, io.minor, io.rbytes, io.wbytes, io.rios, io.wios) == (254, 0, 4096, 8192, 1, 2)
    assert [(h.pagesize, h.current) for h in m.hugetlb] == [("2MB", 0)]


def test_no_swap_limit_stays_unlimited() -> None:
    unlimited = {**RUNC_V2, "memory": {**RUNC_V2["memory"], "swap": {"usage": 40 << 20, "limit": (1 << 64) - 1}}}
    m = stats.metrics_v2(unlimited, {})
    assert (m.memory.swap_usage, m.memory.swap_limit) == (0, (1 << 64) - 1)


def test_memory_events_are_read_from_the_cgroup(tmp_path: Path) -> None:
    (tmp_path / "memory.events").write_text("low 0\nhigh 2\nmax 9\noom 1\noom_kill 1\noom_group_kill 0\nodd line\n")
    assert stats.memory_events(str(tmp_path)) == {
        "low": 0,
        "high": 2,
        "max": 9,
        "oom": 1,
        "oom_kill": 1,
        "oom_group_kill": 0,
    }
    assert stats.memory_events(str(tmp_path / "gone")) == {}


def test_the_node_decides_which_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cgroups, "unified_host", lambda root=cgroups.ROOT: False)
    assert isinstance(stats.metrics(RUNC_V2, 0), v1.Metrics)
    monkeypatch.setattr(cgroups, "unified_host", lambda root=cgroups.ROOT: True)
    m = stats.metrics(RUNC_V2, 0)
    assert isinstance(m, v2.Metrics) and m.memory.usage == 40 << 20


async def test_a_v2_oom_kill_is_reported_when_memory_events_changes(tmp_path: Path) -> None:
    events = tmp_path / "memory.events"
    events.write_text("low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n")
    seen: list[int] = []
    watcher = oom.OOMWatcher(str(tmp_path), lambda: seen.append(1))
    watcher.start()
    try:
        events.write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
        for _ in range(200):
            if seen:
                break
            await asyncio.sleep(0.01)
        assert seen == [1], "reported while the container runs, not only at its exit"
        events.write_text("low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n")  # no new kill: nothing
        await asyncio.sleep(0.1)
        assert seen == [1]
    finally:
        watcher.stop()


def test_a_kill_is_still_seen_when_systemd_removed_the_containers_cgroup_first(tmp_path: Path) -> None:
    pod = tmp_path / "hrtb1-pod1.slice"
    app, pause = pod / "cri-containerd-app.scope", pod / "cri-containerd-pause.scope"
    for d in (app, pause):
        d.mkdir(parents=True)
        (d / "memory.events").write_text("oom 0\noom_kill 0\n")
    (pod / "memory.events").write_text("oom 0\noom_kill 2\n")  # kills of containers gone before
    seen: list[str] = []

    def watcher(d: Path) -> oom.OOMWatcher:
        w = oom.OOMWatcher(str(d), lambda: seen.append(d.name))
        w._pod_base = (2, oom._PUT_DOWN.get(str(pod), 0))  # as start() records it (it also needs a loop)
        return w

    w_app, w_pause = watcher(app), watcher(pause)
    # The app's kill, read by its own watcher while it runs: the pause container's later
    # SIGKILL (its scope gone by then) is not put down to an OOM.
    (app / "memory.events").write_text("oom 1\noom_kill 1\n")
    (pod / "memory.events").write_text("oom 1\noom_kill 3\n")
    w_app.poll()
    for d in (app, pause):
        (d / "memory.events").unlink()
        d.rmdir()
    w_pause.poll(killed=True)
    assert seen == [app.name]

    # A kill nobody read before the scope went: the SIGKILLed init's, once.
    again = pod / "cri-containerd-again.scope"
    again.mkdir()
    (again / "memory.events").write_text("oom 0\noom_kill 0\n")
    w_again = watcher(again)
    w_again._pod_base = (3, oom._PUT_DOWN[str(pod)])
    (again / "memory.events").unlink()
    again.rmdir()
    (pod / "memory.events").write_text("oom 2\noom_kill 5\n")  # two processes of it killed
    w_again.poll(killed=False)  # the inotify wake-up, the scope already gone: leaves it to the exit
    assert seen == [app.name]
    w_again.poll(killed=True)
    w_again.poll(killed=True)
    assert seen == [app.name, "cri-containerd-again.scope"], "one report for the exit"
    assert oom._PUT_DOWN[str(pod)] == 3, "both kills put down to it: none left for a sibling"


def test_the_swap_limit_is_read_from_the_cgroup_when_it_can_be(tmp_path: Path) -> None:
    (tmp_path / "memory.swap.max").write_text("0\n")  # the kubelet's NoSwap
    assert stats.swap_limit(str(tmp_path)) == 0
    assert stats.metrics_v2(RUNC_V2, {}, stats.swap_limit(str(tmp_path))).memory.swap_limit == 0
    (tmp_path / "memory.swap.max").write_text("max\n")
    assert stats.swap_limit(str(tmp_path)) == (1 << 64) - 1
    assert stats.swap_limit(str(tmp_path / "gone")) is None


def test_the_pids_limit_is_read_from_the_cgroup_as_containerd_reads_it(tmp_path: Path) -> None:
    (tmp_path / "pids.max").write_text("max\n")
    assert stats.limit_of(str(tmp_path), "pids.max") == (1 << 64) - 1
    assert stats.metrics_v2(RUNC_V2, {}, None, stats.limit_of(str(tmp_path), "pids.max")).pids.limit == (1 << 64) - 1
    (tmp_path / "pids.max").write_text("100\n")
    assert stats.metrics_v2(RUNC_V2, {}, None, stats.limit_of(str(tmp_path), "pids.max")).pids.limit == 100
    assert stats.limit_of(str(tmp_path / "gone"), "pids.max") is None


def test_the_hugetlb_limit_is_read_from_the_cgroup_as_containerd_reads_it(tmp_path: Path) -> None:
    # runc's v2 stats carry no hugetlb limit (its "max" is 0 there).
    (tmp_path / "hugetlb.2MB.max").write_text("max\n")
    limit = {"2MB": stats.limit_of(str(tmp_path), "hugetlb.2MB.max")}
    assert [(h.pagesize, h.max) for h in stats.metrics_v2(RUNC_V2, {}, hugetlb_max=limit).hugetlb] == [
        ("2MB", (1 << 64) - 1)
    ]
    (tmp_path / "hugetlb.2MB.max").write_text(f"{4 << 21}\n")
    limit = {"2MB": stats.limit_of(str(tmp_path), "hugetlb.2MB.max")}
    assert stats.metrics_v2(RUNC_V2, {}, hugetlb_max=limit).hugetlb[0].max == 4 << 21
    assert stats.metrics_v2(RUNC_V2, {}).hugetlb[0].max == 0  # the cgroup gone: runc's figure
