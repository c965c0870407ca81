"""`hack/vm.py test --resume`: which tests a sitting in the node VM counts as done, and when an
earlier sitting's results may be used at all."""

from __future__ import annotations

import json
from pathlib import Path

from vm import Sittings, ended_well

A = "tests/e2e/test_a.py::test_one[containerd2]"
B = "tests/e2e/test_a.py::test_two[containerd1.7-job-pod]"
C = "tests/integration/test_b.py::test_three"
D = "tests/e2e/test_a.py::test_four"

OUTPUT = f"""cpus 2
============================= test session starts ==============================
{A} PASSED [ 25%]
{B} PASSED [ 50%]
{B} ERROR [ 50%]
{C} SKIPPED (no gcc for the NSS module) [ 75%]
{D} FAILED [100%]
=========================== short test summary info ============================
FAILED {D} - AssertionError
"""


def test_a_test_ended_well_when_it_passed_or_skipped_and_its_teardown_did_not_fail() -> None:
    assert ended_well(OUTPUT) == {A, C}


def test_a_sitting_cut_off_before_recording_itself_still_counts_on_the_same_code(tmp_path: Path) -> None:
    first = Sittings(tmp_path, "k1")
    assert first.done == set()
    (tmp_path / "output.log").write_text(OUTPUT)  # the machine wrote this, then the host went
    (tmp_path / "logs.tgz").write_bytes(b"logs")
    second = Sittings(tmp_path, "k1")
    assert second.done == {A, C}
    # Its output and logs are kept beside the coming sitting's.
    assert (tmp_path / "output.sitting1.log").read_text() == OUTPUT
    assert (tmp_path / "logs.sitting1.tgz").read_bytes() == b"logs"
    second.record(f"{D} PASSED [100%]\n", 0, 12.3)
    state = json.loads((tmp_path / "sittings.json").read_text())
    assert state["done"] == sorted({A, C, D})
    assert [s.get("passed") for s in state["sittings"]] == [None, 1]


def test_nothing_counts_from_other_code_or_a_run_without_resume(tmp_path: Path) -> None:
    Sittings(tmp_path, "k1").record(OUTPUT, 1, 1.0)
    assert Sittings(tmp_path, "k1").done == {A, C}
    assert Sittings(tmp_path, "k2").done == set(), "other code, node or selection"
    assert Sittings(tmp_path, "k1").done == set(), "k2's sitting started afresh"
    assert Sittings(tmp_path, "").done == set(), "a checkout that differs from HEAD"
    # A run without --resume writes output.log over the folder's; it says nothing of k3.
    Sittings(tmp_path, "k3")
    (tmp_path / "output.key").unlink()
    (tmp_path / "output.log").write_text(OUTPUT)
    assert Sittings(tmp_path, "k3").done == set()
