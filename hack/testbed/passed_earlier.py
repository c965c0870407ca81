"""The tests a run that goes on from earlier sittings leaves out (`hack/vm.py test --resume`):
those the file HOTRESTART_PASSED_EARLIER lists by exact id, which passed in earlier sittings
on the same code."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ENV = "HOTRESTART_PASSED_EARLIER"


def leave_out(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the listed tests. (`--deselect` would match by prefix, and so leave out
    `test_x_1_7` with `test_x`.)"""
    listed = os.environ.get(ENV)
    if not listed:
        return
    passed = set(Path(listed).read_text().splitlines())
    left_out = [item for item in items if item.nodeid in passed]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = [item for item in items if item.nodeid not in passed]
