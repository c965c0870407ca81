"""The end-to-end smoke subset on the node shape most clusters run: cgroup v2 only, systemd
as init, containerd with either cgroup driver. It runs in the test bed's node VM
(hack/vm.py: Debian 12, booted with qemu, KVM where it works and emulation otherwise), with
this checkout, its Python and the test bed shared in read-only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Image build (a few minutes, once), boot, and the subset under emulation with its grace
# periods scaled (hack/vm.py).
LIMIT = 3000


@pytest.mark.timeout(LIMIT + 600)
@pytest.mark.parametrize("driver", ["systemd", "cgroupfs"])
def test_the_smoke_subset_passes_on_a_cgroup_v2_systemd_node(testbed: Path, driver: str, tmp_path: Path) -> None:
    out = tmp_path / "vm"
    argv = [sys.executable, str(REPO / "hack" / "vm.py"), "test", "--driver", driver, "--timeout", str(LIMIT)]
    done = subprocess.run([*argv, "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=LIMIT + 500)
    report = done.stdout[-12000:] + "\n" + done.stderr[-4000:]
    assert done.returncode == 0, report
    assert " passed" in done.stdout and " failed" not in done.stdout, report
    # The machine is the node shape it claims: systemd as PID 1, only the unified hierarchy.
    node = dict(line.split(" ", 1) for line in (out / "node.txt").read_text().splitlines() if " " in line)
    assert (node["init"], node["cgroupfs"], node["v1mounts"]) == ("systemd", "cgroup2fs", "0"), node
    assert "memory" in node["controllers"].split(), node
