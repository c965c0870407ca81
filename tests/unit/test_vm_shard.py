"""`hack/vm.py test --shard K/N`: the node VM's whole tiers in N parts, each a sitting of its
own; together the parts run each selected test exactly once."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from testbed.shard import keep, parse, part_of

MODULES = [("tests/integration/a.py", 4), ("tests/e2e/b.py", 30), ("tests/e2e/c.py", 5), ("tests/e2e/d.py", 22)]


def _items() -> list[Any]:
    return [SimpleNamespace(nodeid=f"{m}::test_{i}") for m, n in MODULES for i in range(n)]


def _run(spec: str, items: list[Any], monkeypatch: pytest.MonkeyPatch) -> tuple[list[Any], list[Any]]:
    monkeypatch.setenv("HOTRESTART_SHARD", spec)
    deselected: list[Any] = []
    config: Any = SimpleNamespace(hook=SimpleNamespace(pytest_deselected=lambda items: deselected.extend(items)))
    kept = list(items)
    keep(config, kept)
    return kept, deselected


def test_the_parts_run_every_test_once_and_keep_modules_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    items = _items()
    parts = [_run(f"{k}/3", items, monkeypatch) for k in (1, 2, 3)]
    ran = [t.nodeid for kept, _ in parts for t in kept]
    assert sorted(ran) == sorted(t.nodeid for t in items)
    for kept, deselected in parts:
        assert len(kept) + len(deselected) == len(items)
        modules = {t.nodeid.split("::")[0] for t in kept}
        assert all(sum(1 for t in kept if t.nodeid.startswith(m + "::")) == dict(MODULES)[m] for m in modules)


def test_parts_are_contiguous_and_balanced_by_test_count() -> None:
    assert part_of([(f"m{i}", 1) for i in range(9)], 3) == {f"m{i}": i // 3 + 1 for i in range(9)}
    parts = part_of(MODULES, 2)
    assert list(parts.values()) == sorted(parts.values())
    assert parts == {"tests/integration/a.py": 1, "tests/e2e/b.py": 1, "tests/e2e/c.py": 2, "tests/e2e/d.py": 2}


def test_the_cut_depends_on_the_selection_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    # The same selection collected again cuts the same way (a part's later sittings).
    first, _ = _run("2/2", _items(), monkeypatch)
    again, _ = _run("2/2", _items(), monkeypatch)
    assert [t.nodeid for t in first] == [t.nodeid for t in again]


def test_without_a_shard_nothing_is_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HOTRESTART_SHARD", raising=False)
    items = _items()
    config: Any = SimpleNamespace(hook=SimpleNamespace(pytest_deselected=lambda items: pytest.fail("deselected")))
    keep(config, items)
    assert len(items) == sum(n for _, n in MODULES)


@pytest.mark.parametrize("spec", ["0/2", "3/2", "1", "a/b", "1/0", "-1/2", "1/2/3"])
def test_a_malformed_shard_is_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="K/N"):
        parse(spec)


def test_more_parts_than_modules_leaves_some_empty() -> None:
    parts = part_of([("m1", 3), ("m2", 3)], 4)
    assert set(parts.values()) <= {1, 2, 3, 4}
    assert parts["m1"] < parts["m2"]
