"""Every tier."""

from __future__ import annotations

import pytest

from testbed import passed_earlier


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    passed_earlier.leave_out(config, items)
