"""The zygote's code stamp changes with any module of the package, however deep."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from hotrestart.zygote_client import PACKAGE_DIR, code_stamp


@pytest.fixture
def package(tmp_path: Path) -> Path:
    root = tmp_path / "pkg"
    for rel in ("__init__.py", "daemon.py", "container/__init__.py", "container/container.py", "a/b/c/deep.py"):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("# v1\n")
    return root


def _rewrite_after(path: Path, stamp: str, text: str) -> None:
    """Rewrite `path` until its change time is past `stamp`'s (the clock behind ctime is coarse)."""
    newest = int(stamp.split(":")[1])
    deadline = time.monotonic() + 5
    while True:
        path.write_text(text)
        if path.stat().st_ctime_ns > newest:
            return
        assert time.monotonic() < deadline, "ctime did not advance"
        time.sleep(0.005)


@pytest.mark.parametrize("rel", ["daemon.py", "container/container.py", "a/b/c/deep.py"])
def test_a_changed_module_changes_the_stamp(package: Path, rel: str) -> None:
    before = code_stamp(str(package))
    _rewrite_after(package / rel, before, "# v2\n")
    assert code_stamp(str(package)) != before


def test_an_added_or_removed_module_changes_the_stamp(package: Path) -> None:
    before = code_stamp(str(package))
    (package / "container" / "container.py").unlink()
    removed = code_stamp(str(package))
    assert removed != before
    _rewrite_after(package / "a" / "b" / "new.py", removed, "")
    assert code_stamp(str(package)) not in (before, removed)


def test_compiled_files_and_other_files_do_not_count(package: Path) -> None:
    before = code_stamp(str(package))
    cache = package / "container" / "__pycache__"
    cache.mkdir()
    (cache / "container.cpython-311.py").write_text("")  # named like a module, still not one
    (package / "container" / "notes.txt").write_text("")
    assert code_stamp(str(package)) == before


def test_a_dangling_module_link_does_not_fail(package: Path) -> None:
    before = code_stamp(str(package))
    os.symlink(package / "gone.py", package / "container" / "link.py")
    assert code_stamp(str(package)) != before


def test_the_installed_package_counts_every_module() -> None:
    modules = sum(
        name.endswith(".py")
        for folder, dirs, names in os.walk(PACKAGE_DIR)
        if "__pycache__" not in Path(folder).parts
        for name in names
    )
    assert code_stamp().split(":")[0] == str(modules)
