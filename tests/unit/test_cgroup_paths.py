"""The one /proc/<pid>/cgroup parser: v1, v2 and hybrid lines, and input it must survive."""

from __future__ import annotations

import os
from pathlib import Path

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


def _v2_mount(at: Path) -> str:
    at.mkdir(parents=True, exist_ok=True)
    (at / "cgroup.controllers").write_text("cpu memory\n")
    return str(at)


def test_v1_and_hybrid_lines(tmp_path: Path) -> None:
    found = cgroups.parse(V1_HYBRID)
    assert found[0] == Membership(12, ("freezer",), "/kubepods/pod1/c1")
    assert found[2].controllers == ("cpu", "cpuacct")
    assert found[3].controllers == ("name=systemd",) and not found[3].unified
    assert found[4] == Membership(0, (), "/kubepods/pod1/c1") and found[4].unified
    assert cgroups.controller_dir(found, "memory") == "/sys/fs/cgroup/memory/kubepods/pod1/c1"
    assert cgroups.controller_dir(found, "freezer") == "/sys/fs/cgroup/freezer/kubepods/pod1/c1"
    assert cgroups.controller_dir(found, "cpuacct") == "/sys/fs/cgroup/cpuacct/kubepods/pod1/c1"
    assert cgroups.controller_dir(found, "pids") is None
    # Hybrid: the unified hierarchy is mounted at <root>/unified, the root is a tmpfs.
    assert cgroups.unified_dir(found, str(tmp_path)) is None, "no v2 mount: nothing to write to"
    _v2_mount(tmp_path / "unified")
    assert cgroups.unified_dir(found, str(tmp_path)) == f"{tmp_path}/unified/kubepods/pod1/c1"


def test_v2_only(tmp_path: Path) -> None:
    root = _v2_mount(tmp_path)
    found = cgroups.parse("0::/system.slice/x.scope\n")
    assert cgroups.controller_dir(found, "memory", root) is None
    assert cgroups.unified_dir(found, root) == f"{root}/system.slice/x.scope"
    assert cgroups.unified_dir(cgroups.parse("0::/\n"), root) == root


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
def test_paths_leading_out_of_the_hierarchy_give_no_directory(path: str, tmp_path: Path) -> None:
    root = _v2_mount(tmp_path)
    found = cgroups.parse(f"3:memory:{path}\n0::{path}\n")
    assert cgroups.controller_dir(found, "memory", root) is None
    assert cgroups.unified_dir(found, root) is None


def test_dot_dot_inside_the_hierarchy_is_resolved(tmp_path: Path) -> None:
    root = _v2_mount(tmp_path)
    found = cgroups.parse("0::/a/../b\n")
    assert cgroups.unified_dir(found, root) == f"{root}/b"


def test_control_files_are_never_created(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        cgroups._write(str(tmp_path / "cgroup.freeze"), "0")
    assert not (tmp_path / "cgroup.freeze").exists()


def test_a_pid_in_the_shims_own_cgroup_is_never_frozen() -> None:
    assert cgroups.freeze_quiescent(os.getpid()) is False


def test_of_pid() -> None:
    assert cgroups.of_pid(os.getpid()), "this process belongs to some cgroup"
    assert cgroups.of_pid(2**22 + 1) == []  # above pid_max: never a process
