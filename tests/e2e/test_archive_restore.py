"""Restore from a CRI checkpoint archive (containerd 2.1-2.3 create a container whose image is
an archive by calling the shim's Create with its images): off by default; when the runtime
options allow it, only archives this shim attested with the store key restore.
"""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from hotpods import Incarnation

from testbed import BIN_DIR, BUSYBOX_IMAGE, ContainerdInstance, host
from testbed.registry import LocalRegistry

pytestmark = [pytest.mark.e2e]

ATTESTATION = "checkpoint/hotrestart-attestation.json"


@pytest.fixture(scope="module")
def nodes(
    containerd_factory: Callable[..., ContainerdInstance], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ContainerdInstance, ContainerdInstance]]:
    """A node with the defaults, and one that allows attested archives (with a store key)."""
    key = tmp_path_factory.mktemp("archive-key") / "store-key"
    key.write_text(f"k1:{base64.b64encode(os.urandom(32)).decode()}\n")
    key.chmod(0o600)
    default = containerd_factory("2")
    allowing = containerd_factory("2", start=False)
    allowing.hotrestart_options.update({"AllowArchiveRestore": True, "StoreKeyFile": str(key)})
    allowing.start()
    yield default, allowing
    for inst in (default, allowing):
        inst.stop()


@pytest.fixture(scope="module")
def registry(nodes: tuple[ContainerdInstance, ContainerdInstance]) -> Iterator[LocalRegistry]:
    """One registry for the module: an archive names its base image by this registry's
    address (the image store keeps every name it was given, and the checkpoint records one)."""
    assert nodes[0].images_tar is not None
    with LocalRegistry(nodes[0].images_tar) as served:
        yield served


def _checkpointed(
    inst: ContainerdInstance, registry: LocalRegistry, tmp: Path, name: str, runtime: str
) -> tuple[Path, int, int]:
    """A counting pod of `runtime`, checkpointed through the CRI into an archive and removed:
    (archive, its count at the checkpoint, the checksum of its memory)."""
    image = registry.ref(BUSYBOX_IMAGE)
    # Known by a name of this registry, with a digest, as if pulled from it: the restore pulls
    # the base image by that digest.
    for ref in (image, registry.digest_ref(BUSYBOX_IMAGE)):
        inst.ctr("images", "tag", "--force", BUSYBOX_IMAGE, ref)
    client = inst.cri()
    pod = Incarnation(client, inst, tmp, name, runtime_handler=runtime)
    pod.create(image=image)
    assert host.wait_until(lambda: pod.counter() >= 3, 20), pod.lines()[-3:]
    archive = tmp / f"{name}.tar"
    client.checkpoint_container(pod.cid, str(archive))
    count, checksum, _ = pod.state()
    pod.stop(grace=0)
    pod.remove()
    return archive, count, checksum


def _restore(inst: ContainerdInstance, tmp: Path, name: str, archive: Path) -> Incarnation:
    pod = Incarnation(inst.cri(), inst, tmp, name)
    pod.create(image=str(archive))
    return pod


def _refused(inst: ContainerdInstance, tmp: Path, name: str, archive: Path) -> str:
    with pytest.raises(grpc.RpcError) as err:
        _restore(inst, tmp, name, archive)
    return str(err.value.details())


def _changed(archive: Path, member: str, edit: Callable[[bytes], bytes]) -> Path:
    """A copy of `archive` with one member's content edited."""
    out = archive.with_name(f"changed-{archive.name}")
    with tarfile.open(archive) as src, tarfile.open(out, "w") as dst:
        for info in src.getmembers():
            data = src.extractfile(info).read() if info.isfile() else None  # type: ignore[union-attr]
            if info.name == member and data is not None:
                data = edit(data)
                info.size = len(data)
            dst.addfile(info, io.BytesIO(data) if data is not None else None)
    return out


def test_archive_restore_is_refused_by_default(
    nodes: tuple[ContainerdInstance, ContainerdInstance], registry: LocalRegistry, tmp_path: Path
) -> None:
    default, _ = nodes
    archive, _, _ = _checkpointed(default, registry, tmp_path, "off-src", "hotrestart")
    why = _refused(default, tmp_path, "off-dst", archive)
    assert "restoring from a checkpoint archive is off on this node" in why, why
    assert "AllowArchiveRestore" in why, why


def test_an_attested_archive_restores_and_a_changed_one_does_not(
    nodes: tuple[ContainerdInstance, ContainerdInstance], registry: LocalRegistry, tmp_path: Path
) -> None:
    _, allowing = nodes
    archive, at, checksum = _checkpointed(allowing, registry, tmp_path, "src-0", "hotrestart")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert ATTESTATION in names, sorted(names)
    pages = next(n for n in names if n.startswith("checkpoint/pages-"))

    restored = _restore(allowing, tmp_path, "dst-0", archive)
    assert host.wait_until(lambda: restored.counter() > at + 2, 10), restored.lines()[-3:]
    _, s, t = restored.state()
    assert (s, t) == (checksum, checksum), "the same memory: a restore, not a cold start"
    assert not any(line.startswith("hotrestart:") for line in restored.lines())
    restored.remove()

    one_byte = _changed(archive, pages, lambda b: bytes([b[0] ^ 1]) + b[1:])
    why = _refused(allowing, tmp_path, "dst-1", one_byte)
    assert f"image {pages.split('/', 1)[1]} differs from what was attested" in why, why
    listed = b'"files": [["x.img", 0, "' + b"0" * 64 + b'"],'
    extra = _changed(archive, ATTESTATION, lambda b: b.replace(b'"files": [', listed))
    why = _refused(allowing, tmp_path, "dst-2", extra)
    assert "does not authenticate" in why, why


def test_an_archive_of_another_runtime_is_refused(
    nodes: tuple[ContainerdInstance, ContainerdInstance], registry: LocalRegistry, tmp_path: Path
) -> None:
    """runc-v2's CRI checkpoint carries no attestation: nothing vouches for its images."""
    _, allowing = nodes
    archive, _, _ = _checkpointed(allowing, registry, tmp_path, "runc-src", "runc")
    why = _refused(allowing, tmp_path, "runc-dst", archive)
    assert "not taken through this shim with a store key" in why, why


def test_doctor_says_which_mode_each_node_is_in(nodes: tuple[ContainerdInstance, ContainerdInstance]) -> None:
    env = {**os.environ, "PATH": f"{BIN_DIR}:{os.environ['PATH']}"}
    said = []
    for inst in nodes:
        run = subprocess.run(
            [sys.executable, "-m", "hotrestart.cli", "doctor", "--containerd-config", str(inst.config_path)],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        line = next((line for line in run.stdout.splitlines() if "archive restore (hotrestart)" in line), None)
        assert line is not None, run.stdout + run.stderr
        said.append(line)
    assert "off (the default)" in said[0], said
    assert "on, archives attested with the store key only" in said[1], said
