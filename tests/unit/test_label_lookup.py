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
        await lookup.pod_labels(CommandRunner(reaper), str(tmp_path / "none.sock"), "k8s.io", "abc")


async def test_bad_arguments_are_refused_by_the_helper(reaper: Reaper, tmp_path: Path) -> None:
    with pytest.raises(ContainerdAPIError, match="namespace"):
        await lookup.pod_labels(CommandRunner(reaper), str(tmp_path / "none.sock"), "../etc", "abc")


def test_the_helper_runs_isolated() -> None:
    argv = lookup.argv("/run/containerd/containerd.sock", "k8s.io", "abc", 2.0)
    assert argv[:3] == [sys.executable, "-I", "-c"]
    assert os.path.isfile(os.path.join(argv[4], "hotrestart", "workload", "lookup.py")), "this copy of the package"


class _Slow:
    async def run(self, argv: list[str], timeout: float | None = None) -> object:
        raise TimeoutError


async def test_a_lookup_that_does_not_answer_in_time_says_so_and_names_the_setting() -> None:
    with pytest.raises(ContainerdAPIError, match=r"did not answer within 2s \(HOTRESTART_LABEL_LOOKUP_TIMEOUT\)"):
        await lookup.pod_labels(_Slow(), "/x.sock", "k8s.io", "abc", timeout=2.0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "expected"),
    [("", 8.0), ("60", 60.0), ("1", 3.5), ("nan", 8.0), ("junk", 8.0), ("1e9", 600.0)],
)
def test_the_lookup_timeout_comes_from_the_environment_within_bounds(value: str, expected: float) -> None:
    assert lookup.lookup_timeout({"HOTRESTART_LABEL_LOOKUP_TIMEOUT": value}) == expected
