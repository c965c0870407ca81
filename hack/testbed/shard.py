"""One part of a selection too long for one sitting (`hack/vm.py test --shard K/N`): under
emulation the node VM's whole tiers take longer than a machine is held here, so they can be
run as N parts, each on a fresh machine. The parts are cut at test-module boundaries (a
module's fixtures are set up once per part, not once per sitting) and balanced by test count;
the cut depends only on the collected selection, so every sitting of part K runs the same
tests and the N parts together run each test once."""

from __future__ import annotations

import os
import re

import pytest

ENV = "HOTRESTART_SHARD"
_SPEC = re.compile(r"^([1-9][0-9]*)/([1-9][0-9]*)$")


def parse(spec: str) -> tuple[int, int]:
    """'K/N' (1 <= K <= N) as (K, N)."""
    m = _SPEC.match(spec.strip())
    if not m or int(m.group(1)) > int(m.group(2)):
        raise ValueError(f"a shard is K/N with 1 <= K <= N, not {spec!r}")
    return int(m.group(1)), int(m.group(2))


def part_of(modules: list[tuple[str, int]], count: int) -> dict[str, int]:
    """Each module's part (1..count), modules in collection order with their test counts: a
    module goes to the part its middle test falls in, so parts stay contiguous."""
    total = sum(n for _, n in modules)
    parts: dict[str, int] = {}
    start = 0
    for name, n in modules:
        middle = start + n / 2
        parts[name] = min(count, int(middle * count / total) + 1) if total else 1
        start += n
    return parts


def keep(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect every test outside the part HOTRESTART_SHARD names."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    k, n = parse(spec)
    modules: dict[str, int] = {}
    for item in items:
        modules[_module(item)] = modules.get(_module(item), 0) + 1
    parts = part_of(list(modules.items()), n)
    others = [item for item in items if parts[_module(item)] != k]
    if others:
        config.hook.pytest_deselected(items=others)
        items[:] = [item for item in items if parts[_module(item)] == k]


def _module(item: pytest.Item) -> str:
    return item.nodeid.split("::", 1)[0]
