"""Every tier."""

from __future__ import annotations

import pytest

from testbed import passed_earlier, shard


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The part first: what passed earlier must not move the cut between a part's sittings.
    shard.keep(config, items)
    passed_earlier.leave_out(config, items)
