"""The store key end to end: sealed checkpoints restore; unsealed, altered or foreign ones
never do, and the pod starts cold.

Two containerds share one store, as two nodes sharing a mount would: the keyed one is the
node under test, the other plays whoever else can write the store.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hotpods import Incarnation, chunk_files, run_and_stop, stored

from testbed import ContainerdInstance, host

pytestmark = [pytest.mark.e2e]

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _key_file(path: Path, name: str) -> Path:
    path.write_text(f"{name}:{base64.b64encode(os.urandom(32)).decode()}\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def nodes(
    containerd_factory: Callable[..., ContainerdInstance], tmp_path: Path
) -> Iterator[tuple[ContainerdInstance, ContainerdInstance, ContainerdInstance]]:
    store = tmp_path / "shared-store"
    keyed = containerd_factory("2", store=store, env={"HOTRESTART_STORE_KEY": str(_key_file(tmp_path / "k", "k1"))})
    other = containerd_factory("2", store=store, env={"HOTRESTART_STORE_KEY": str(_key_file(tmp_path / "o", "k1"))})
    plain = containerd_factory("2", store=store)
    yield keyed, other, plain
    for inst in (keyed, other, plain):
        inst.stop()


def _stop_and_publish(inst: ContainerdInstance, tmp: Path, name: str) -> tuple[int, int, Path]:
    counter, checksum = run_and_stop(inst.cri(), inst, tmp, name)
    return counter, checksum, _published(inst, name)


def _published(inst: ContainerdInstance, pod: str) -> Path:
    """The checkpoint of `pod` once published (the store also holds other pods')."""

    def find() -> Path | None:
        for ckpt in stored(inst):
            try:
                if json.loads((ckpt / "manifest.json").read_text())["identity"]["pod"] == pod:
                    return ckpt
            except (OSError, ValueError, KeyError):
                continue
        return None

    assert host.wait_until(lambda: find() is not None, 30), f"no checkpoint of {pod} published"
    found = find()
    assert found is not None
    return found


def _starts(inst: ContainerdInstance, tmp: Path, name: str) -> tuple[int, int, list[str]]:
    pod = Incarnation(inst.cri(), inst, tmp, name)
    pod.create()
    first = pod.first()
    lines = pod.lines()
    pod.remove()
    return first[0], first[1], lines


def test_sealed_checkpoints_restore_and_nothing_else_does(
    nodes: tuple[ContainerdInstance, ContainerdInstance, ContainerdInstance], tmp_path: Path
) -> None:
    keyed, other, plain = nodes
    # Sealed: the manifest carries its MAC, no stored chunk is readable zstd, and it restores.
    counter, checksum, ckpt = _stop_and_publish(keyed, tmp_path, "sealed-0")
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["seal"]["key"] == "k1" and len(manifest["seal"]["mac"]) == 64
    chunks = chunk_files(keyed, ckpt, prefix="")
    assert chunks
    for chunk in chunks:
        assert chunk.read_bytes()[:4] != ZSTD_MAGIC, chunk
    n, s, lines = _starts(keyed, tmp_path, "sealed-0")
    assert (n, s) == (counter + 1, checksum), lines

    # Written by a node without the key: never restored by the keyed one.
    _stop_and_publish(plain, tmp_path, "planted-0")
    n, _, lines = _starts(keyed, tmp_path, "planted-0")
    assert n == 1, lines
    assert not any(line.startswith("hotrestart: restoring") for line in lines)

    # Sealed with another key of the same name: does not authenticate.
    _stop_and_publish(other, tmp_path, "foreign-0")
    n, _, lines = _starts(keyed, tmp_path, "foreign-0")
    assert n == 1, lines

    # Sealed with the right key, then altered: a changed field breaks the MAC.
    counter, _, ckpt = _stop_and_publish(keyed, tmp_path, "altered-0")
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["tcp"] = "keep"
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    n, _, lines = _starts(keyed, tmp_path, "altered-0")
    assert n == 1, lines
    assert stored(keyed), "an altered checkpoint is left for retention, not restored"
