"""`hack/vm.py test --resume`: which tests a sitting in the node VM counts as passed, when an
earlier sitting's results may be used at all, and how the next one leaves them out."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from testbed.passed_earlier import leave_out
from vm import Sittings, outcomes

A = "tests/e2e/test_a.py::test_one[containerd2]"
B = "tests/e2e/test_a.py::test_two[containerd1.7-job-pod]"
C = "tests/integration/test_b.py::test_three"
D = "tests/e2e/test_a.py::test_four"

OUTPUT = f"""cpus 2
============================= test session starts ==============================
{A} PASSED [ 25%]
{C} SKIPPED (no gcc for the NSS module) [ 50%]
{D} FAILED [ 75%]
{B} PASSED [100%]
=========================== short test summary info ============================
FAILED {D} - AssertionError
"""
# A teardown that failed after its test passed: the last test of a session whose containerd
# leak check failed looks like this.
TEARDOWN_FAILED = OUTPUT.replace(f"{B} PASSED [100%]\n", f"{B} PASSED [100%]\n{B} ERROR [100%]\n")


def test_a_test_counts_when_it_passed_or_skipped() -> None:
    assert outcomes(OUTPUT) == ({A, B, C}, {D})


def test_no_test_of_a_sitting_counts_when_a_teardown_failed_after_a_pass() -> None:
    assert outcomes(TEARDOWN_FAILED) == (set(), {B, D})


def test_a_sitting_cut_off_before_recording_itself_still_counts_on_the_same_code(tmp_path: Path) -> None:
    # The order of hack/vm.py's test(): a sitting starts; the machine writes output.log and
    # the logs; the host is killed before record(); the next sitting starts.
    Sittings(tmp_path, "k1")
    (tmp_path / "output.log").write_text(OUTPUT)
    (tmp_path / "logs.tgz").write_bytes(b"logs")
    second = Sittings(tmp_path, "k1")
    assert second.done == {A, B, C}
    assert (tmp_path / "passed-earlier.txt").read_text().splitlines() == sorted({A, B, C})
    # Its output and logs are kept beside the coming sitting's.
    assert (tmp_path / "output.sitting1.log").read_text() == OUTPUT
    assert (tmp_path / "logs.sitting1.tgz").read_bytes() == b"logs"
    second.record(f"{D} PASSED [100%]\n", 0, 12.3, "k1")
    state = json.loads((tmp_path / "sittings.json").read_text())
    assert state["done"] == sorted({A, B, C, D})
    assert [(s["passed"], s["failed"], s["rc"]) for s in state["sittings"]] == [(3, [D], "cut off"), (1, [], 0)]


def test_nothing_counts_from_other_code_or_a_run_without_resume(tmp_path: Path) -> None:
    Sittings(tmp_path, "k1").record(OUTPUT, 1, 1.0, "k1")
    assert Sittings(tmp_path, "k1").done == {A, B, C}
    assert Sittings(tmp_path, "k2").done == set(), "other code, node or selection"
    assert Sittings(tmp_path, "k1").done == set(), "k2's sitting started afresh"
    # A run without --resume writes output.log over the folder's; it says nothing of k3.
    Sittings(tmp_path, "k3")
    (tmp_path / "output.key").unlink()
    (tmp_path / "output.log").write_text(OUTPUT)
    assert Sittings(tmp_path, "k3").done == set()


def test_a_checkout_that_differs_from_head_neither_uses_nor_keeps_sittings(tmp_path: Path) -> None:
    Sittings(tmp_path, "k1").record(OUTPUT, 1, 1.0, "k1")
    dirty = Sittings(tmp_path, "")
    assert dirty.done == set()
    dirty.record(f"{D} PASSED [100%]\n", 0, 1.0, "")
    assert Sittings(tmp_path, "k1").done == {A, B, C}, "what k1 had is still there"


def test_a_sitting_during_which_the_checkout_changed_counts_for_nothing(tmp_path: Path) -> None:
    Sittings(tmp_path, "k1").record(OUTPUT, 1, 1.0, "")
    assert Sittings(tmp_path, "k1").done == set()


def test_the_next_sitting_leaves_out_exactly_what_passed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `--deselect tests/x.py::test_run` would leave out `test_run_1_7` too.
    listed = tmp_path / "passed-earlier.txt"
    listed.write_text("tests/x.py::test_run\n")
    monkeypatch.setenv("HOTRESTART_PASSED_EARLIER", str(listed))
    items: list[Any] = [SimpleNamespace(nodeid=n) for n in ("tests/x.py::test_run", "tests/x.py::test_run_1_7")]
    deselected: list[Any] = []
    config: Any = SimpleNamespace(hook=SimpleNamespace(pytest_deselected=lambda items: deselected.extend(items)))
    leave_out(config, items)
    assert [i.nodeid for i in items] == ["tests/x.py::test_run_1_7"]
    assert [i.nodeid for i in deselected] == ["tests/x.py::test_run"]
