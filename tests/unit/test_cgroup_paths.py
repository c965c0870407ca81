"""The one /proc/<pid>/cgroup parser: v1, v2 and hybrid lines, and input it must survive."""

from __future__ import annotations

import os

import pytest

from hotrestart.runtime import cgroups
from hotrestart.runtime.cgroups import Membership

V1_HYBRID = """\
12:freezer:/kubepods/pod1/c1
11:memory:/kubepods/pod1/c1
4:cpu,cpuacct:/kubepods/pod1/c1
1:name=systemd:/kubepods/pod1/c1
0::/kubepods/pod1/c1
"""


def test_v1_and_hybrid_lines() -> None:
    found = cgroups.parse(V1_HYBRID)
    assert found[0] == Membership(12, ("freezer",), "/kubepods/pod1/c1")
    assert found[2].controllers == ("cpu", "cpuacct")
    assert found[3].controllers == ("name=systemd",) and not found[3].unified
    assert found[4] == Membership(0, (), "/kubepods/pod1/c1") and found[4].unified
    assert cgroups.controller_dir(found, "memory") == "/sys/fs/cgroup/memory/kubepods/pod1/c1"
    assert cgroups.controller_dir(found, "freezer") == "/sys/fs/cgroup/freezer/kubepods/pod1/c1"
    assert cgroups.controller_dir(found, "cpuacct") == "/sys/fs/cgroup/cpuacct/kubepods/pod1/c1"
    assert cgroups.controller_dir(found, "pids") is None
    assert cgroups.unified_dir(found) == "/sys/fs/cgroup/kubepods/pod1/c1"


def test_v2_only() -> None:
    found = cgroups.parse("0::/system.slice/x.scope\n")
    assert cgroups.controller_dir(found, "memory") is None
    assert cgroups.unified_dir(found) == "/sys/fs/cgroup/system.slice/x.scope"
    assert cgroups.unified_dir(cgroups.parse("0::/\n")) == "/sys/fs/cgroup"


def test_a_path_may_hold_colons() -> None:
    assert cgroups.parse("0::/a:b:c\n") == [Membership(0, (), "/a:b:c")]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "\n\n",
        "garbage",
        "0:",
        "x::/a",
        "-1::/a",
        "0::relative",
        "0::",
        "0::/a\0b",
        "\ufeff0::/a",
    ],
)
def test_malformed_lines_are_skipped(text: str) -> None:
    assert cgroups.parse(text + "\n0::/ok") == [Membership(0, (), "/ok")]


@pytest.mark.parametrize("path", ["/../../etc", "/..", "/a/../../b"])
def test_paths_leading_out_of_the_hierarchy_give_no_directory(path: str) -> None:
    found = cgroups.parse(f"3:memory:{path}\n0::{path}\n")
    assert cgroups.controller_dir(found, "memory") is None
    assert cgroups.unified_dir(found) is None


def test_dot_dot_inside_the_hierarchy_is_resolved() -> None:
    found = cgroups.parse("0::/a/../b\n")
    assert cgroups.unified_dir(found) == "/sys/fs/cgroup/b"


def test_of_pid() -> None:
    assert cgroups.of_pid(os.getpid()), "this process belongs to some cgroup"
    assert cgroups.of_pid(2**22 + 1) == []  # above pid_max: never a process
