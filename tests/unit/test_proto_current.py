"""The committed protobuf code under shim/hotrestart/api matches its .proto files.

Regenerates everything with hack/gen-proto.sh into a temporary directory and
compares byte for byte.  Needs the pinned grpcio-tools: without grpc_tools the
test is skipped locally and fails under CI.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.ci import in_ci

REPO = Path(__file__).resolve().parents[2]
API = Path("hotrestart") / "api"
COMMITTED = REPO / "shim" / API
GEN_SCRIPT = REPO / "hack" / "gen-proto.sh"


def _generated_files(root: Path) -> set[Path]:
    """Relative paths of generated files (modules, stubs, package markers)."""
    found: set[Path] = set()
    for path in root.rglob("*"):
        if not path.is_file() or "__pycache__" in path.parts:
            continue
        if path.name == "__init__.py" or path.name.endswith(("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")):
            found.add(path.relative_to(root))
    return found


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if importlib.util.find_spec("grpc_tools") is None:
        msg = "grpcio-tools is not installed (pip install -e '.[dev]')"
        if in_ci():
            pytest.fail(msg)
        pytest.skip(msg)
    out = tmp_path_factory.mktemp("proto-out")
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", str(GEN_SCRIPT), str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"hack/gen-proto.sh failed:\n{proc.stdout}{proc.stderr}"
    return out / API


def test_same_file_set(regenerated: Path) -> None:
    expected = _generated_files(regenerated)
    committed = _generated_files(COMMITTED)
    assert expected, "gen-proto.sh produced nothing"
    missing = sorted(str(p) for p in expected - committed)
    stale = sorted(str(p) for p in committed - expected)
    assert not missing and not stale, f"run hack/gen-proto.sh and commit the result; missing={missing} stale={stale}"


def test_same_bytes(regenerated: Path) -> None:
    differing = sorted(
        str(rel)
        for rel in _generated_files(regenerated) & _generated_files(COMMITTED)
        if (regenerated / rel).read_bytes() != (COMMITTED / rel).read_bytes()
    )
    assert not differing, f"out of date, run hack/gen-proto.sh and commit: {differing}"


def test_task_v3_matches_v2() -> None:
    """containerd.task.v3 is containerd.task.v2 under another package name."""

    def body(version: str) -> list[str]:
        text = (COMMITTED / "containerd" / "task" / version / "shim.proto").read_text()
        return [line for line in text.splitlines() if not line.startswith("//") and not line.startswith("package ")]

    assert body("v2") == body("v3")
