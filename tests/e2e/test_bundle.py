"""The node bundle (`make dist`) on a node without Python: containerd runs its shims from it.

containerd runs in a mount namespace of its own where every Python of the host (interpreters,
standard libraries, pyenv) is masked, with only the bundle's bin/ and a directory holding
containerd and runc first on PATH. A pod is stopped and created again: it must continue from
its checkpoint, taken and restored by the bundle's own CRIU (the only one on that PATH).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hotpods import Incarnation, run_and_stop, wait_published

from testbed import BIN_DIR, ContainerdInstance
from testbed.ci import in_ci

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]

# Masks every Python the host has, checks that none runs any more, then execs containerd.
# Symlinks are left alone: what they point at is masked itself.
MASK = r"""
set -eu
for d in /usr/lib/python3* /usr/local/lib/python3* /root/.pyenv /opt/pyenv; do
    if [ -d "$d" ]; then mount -t tmpfs -o ro,size=4k,mode=0555 hotrestart-mask "$d"; fi
done
for f in /usr/bin/python* /usr/local/bin/python*; do
    if [ -f "$f" ] && [ ! -L "$f" ]; then mount --bind /dev/null "$f"; fi
done
for p in python3 python; do
    if PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$p" -c '' 2>/dev/null; then
        echo "the host's $p still runs" >&2
        exit 1
    fi
done
if "$HOTRESTART_TEST_PYTHON" -c '' 2>/dev/null; then
    echo "the test's own Python still runs" >&2
    exit 1
fi
exec "$@"
"""


def bundle_tarball() -> Path:
    from hotrestart import __version__ as version

    return REPO / "dist" / f"hotrestart-{version}-linux-amd64.tar.gz"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundle from `make dist`, unpacked into a fresh directory (as a node would)."""
    tarball = bundle_tarball()
    if not tarball.is_file():
        message = f"no node bundle at {tarball} (run `make dist`)"
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    where = tmp_path_factory.mktemp("node")
    with tarfile.open(tarball) as tar:
        tar.extractall(where, filter="tar")
    [root] = list(where.iterdir())
    return root


def _containerd_only(where: Path) -> Path:
    """A directory with containerd, its runc shim and runc: what a node has without us."""
    where.mkdir()
    for name in ("containerd", "containerd-shim-runc-v2", "ctr", "runc"):
        (where / name).symlink_to(os.path.realpath(BIN_DIR / name))
    return where


def _processes_naming(text: str) -> list[list[str]]:
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if any(text in a for a in argv):
            found.append(argv)
    return found


def test_hot_restart_with_no_python_on_the_node(
    bundle: Path, containerd_factory: Callable[..., ContainerdInstance], tmp_path: Path
) -> None:
    carried = json.loads((bundle / "share" / "hotrestart" / "bundle.json").read_text())
    path = [str(bundle / "bin"), str(_containerd_only(tmp_path / "containerd-bin")), "/usr/sbin:/usr/bin:/sbin:/bin"]
    # The only CRIU within reach is the bundle's: a checkpoint proves it ran.
    assert shutil.which("criu", path=":".join(path[1:])) is None, "another CRIU is on the node's PATH"

    inst = containerd_factory(
        "2",
        shim_bin_dir=bundle / "bin",
        path=path,
        env={"HOTRESTART_TEST_PYTHON": sys.executable},
        command_prefix=["/usr/bin/unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", MASK, "mask"],
    )
    client = inst.cri()
    try:
        counter, checksum = run_and_stop(client, inst, tmp_path, "bundled-0")
        [ckpt] = wait_published(inst)
        manifest = json.loads((ckpt / "manifest.json").read_text())
        assert manifest["runtime"]["criu"] == carried["criu"], manifest["runtime"]

        # Every shim and the zygote run the bundle's interpreter through the bundle's loader.
        shims = _processes_naming(str(inst.zygote_socket))
        assert shims, "no zygote or shim of this containerd is running"
        assert all(argv[0].startswith(str(bundle) + "/") for argv in shims), shims

        again = Incarnation(client, inst, tmp_path, "bundled-0")
        again.create()
        time.sleep(0.5)
        first = again.first()
        assert first[:2] == (counter + 1, checksum), (first, counter, checksum)
        assert any(line.startswith("hotrestart: restoring from checkpoint") for line in again.lines())
        again.remove()
    finally:
        client.remove_all(stop_timeout=0)
        client.close()
        inst.stop()


OLDER_RELEASE = "bullseye"  # Debian 11: glibc 2.31, older than the bundle's own
MIRROR = os.environ.get("HOTRESTART_DEBIAN_MIRROR", "http://deb.debian.org/debian")

# Runs the bundle inside the older root (a chroot) with /proc, /sys and /dev of the host, in
# a mount namespace of its own so that nothing stays mounted afterwards.
IN_CHROOT = r"""
set -eu
root=$1
shift
mount --bind "$root" "$root"  # CRIU wants its root to be a mount point
mount -t proc proc "$root/proc"
mount --rbind /sys "$root/sys"
mount --rbind /dev "$root/dev"
exec /usr/sbin/chroot "$root" "$@"
"""


@pytest.fixture(scope="module")
def older_root(tmp_path_factory: pytest.TempPathFactory, bundle: Path) -> Path:
    """A minimal root file system of an older Debian (debootstrap, no Python), with the bundle in it."""
    root = tmp_path_factory.mktemp("older") / OLDER_RELEASE
    done = subprocess.run(
        ["debootstrap", "--variant=minbase", OLDER_RELEASE, str(root), MIRROR],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"debootstrap {OLDER_RELEASE} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    assert not list((root / "usr" / "bin").glob("python*")), "the older root must have no Python"
    subprocess.run(["cp", "-a", str(bundle), str(root / "opt" / "hotrestart")], check=True)
    return root


def _in_older_root(root: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    wrapper = ["/usr/bin/unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", IN_CHROOT, "sh"]
    return subprocess.run(
        [*wrapper, str(root), *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
    )


def test_bundle_runs_on_an_older_glibc_without_python(older_root: Path, bundle: Path) -> None:
    carried = json.loads((bundle / "share" / "hotrestart" / "bundle.json").read_text())
    ldd = _in_older_root(older_root, "/usr/bin/ldd", "--version")
    host_glibc = ldd.stdout.splitlines()[0].split()[-1]
    assert tuple(map(int, host_glibc.split("."))) < tuple(map(int, carried["glibc"].split("."))), (host_glibc, carried)

    version = _in_older_root(older_root, "/opt/hotrestart/bin/hotrestart", "version")
    assert version.returncode == 0, version.stderr
    assert f"hotrestart {carried['version']}" in version.stdout
    assert carried["python"] in version.stdout and carried["criu"] in version.stdout, version.stdout

    criu = _in_older_root(older_root, "/opt/hotrestart/bin/criu", "check")
    assert criu.returncode == 0 and "Looks good" in criu.stdout + criu.stderr, criu.stdout + criu.stderr

    # The older root has no containerd or runc: the doctor says so, and still checks CRIU
    # with the bundle's own binary.
    doctor = _in_older_root(older_root, "/opt/hotrestart/bin/hotrestart", "doctor")
    assert "Traceback" not in doctor.stdout + doctor.stderr, doctor.stdout + doctor.stderr
    assert "/opt/hotrestart/bin/criu" in doctor.stdout, doctor.stdout
    assert "Looks good" in doctor.stdout, doctor.stdout
    assert "containerd" in doctor.stdout, doctor.stdout
