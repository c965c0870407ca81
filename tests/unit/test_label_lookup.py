"""The label lookup's helper process: its answer, or its reason, comes back; gRPC stays out
of the asking process."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from hotrestart.errors import ContainerdAPIError
from hotrestart.reaper import Reaper
from hotrestart.runtime.command import CommandRunner
from hotrestart.workload import lookup


async def test_a_missing_containerd_is_a_clear_error(reaper: Reaper, tmp_path: Path) -> None:
    with pytest.raises(ContainerdAPIError, match="cannot reach containerd"):
        await lookup.pod_labels(CommandRunner(reaper), str(tmp_path / "none.sock"), "k8s.io", "abc", timeout=1.0)


async def test_bad_arguments_are_refused_by_the_helper(reaper: Reaper, tmp_path: Path) -> None:
    with pytest.raises(ContainerdAPIError, match="namespace"):
        await lookup.pod_labels(CommandRunner(reaper), str(tmp_path / "none.sock"), "../etc", "abc", timeout=1.0)


def test_the_helper_runs_isolated() -> None:
    argv = lookup.argv("/run/containerd/containerd.sock", "k8s.io", "abc", 2.0)
    assert argv[:3] == [sys.executable, "-I", "-c"]
    assert os.path.isfile(os.path.join(argv[4], "hotrestart", "workload", "lookup.py")), "this copy of the package"
