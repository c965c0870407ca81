"""A hostile tenant's files through hot restart, end to end through containerd.

The container controls its root filesystem's upper layer and the emptyDirs it carries, and
keeps changing them while periodic and API checkpoints capture them. None of it may make
the shim (root on the node) load its code, read host files into a checkpoint, or write
outside the container's own tree.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from hotpods import TIME_SCALE, Incarnation, run_and_stop, stored, wait_published

from cri import CRIClient
from hotrestart.store import archive
from hotrestart.store.store import Store
from testbed import ContainerdInstance, host

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("empty_store")]

COUNTING = 'i=0; while :; do i=$((i+1)); echo "$i 1 1"; sleep 0.1; done'

# Loaded by glibc's NSS into whoever does a name lookup under this root: it records that it
# ran, inside the root it was loaded in and, after leaving any chroot, on the node itself.
NSS_MODULE = r"""
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
__attribute__((constructor)) static void loaded(void) {
    close(open("/tmp/MARKER-inside", O_CREAT | O_WRONLY, 0644));
    mkdir("/.out", 0700);
    if (chroot("/.out") == 0) {
        for (int i = 0; i < 64; i++) chdir("..");
        chroot(".");
    }
    close(open("/tmp/MARKER", O_CREAT | O_WRONLY, 0644));
}
"""


@pytest.fixture
def nss_payload(tmp_path: Path) -> tuple[Path, str]:
    """A folder holding libnss_evil.so.2 built for this node, and the marker's name."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the NSS module")
    marker = f"hotrestart-nss-{uuid.uuid4().hex}"
    payload = tmp_path / "payload"
    payload.mkdir()
    (payload / "evil.c").write_text(NSS_MODULE.replace("MARKER", marker))
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-o", str(payload / "libnss_evil.so.2"), str(payload / "evil.c")], check=True
    )
    return payload, marker


def _plant(root: str) -> str:
    """Shell that installs the module and an nsswitch.conf naming it under `root`."""
    return (
        f"for d in {root}/lib {root}/lib64 {root}/usr/lib {root}/lib/x86_64-linux-gnu "
        f"{root}/usr/lib/x86_64-linux-gnu; do mkdir -p $d && cp /payload/libnss_evil.so.2 $d/; done; "
        f"mkdir -p {root}/etc; printf 'passwd: evil\\ngroup: evil\\nshadow: evil\\n' > {root}/etc/nsswitch.conf; "
        f"chown 4242:4242 {root}/etc/nsswitch.conf {root}/lib/libnss_evil.so.2; "
    )


def _no_marker(marker: str) -> None:
    assert not Path("/tmp", marker).exists(), "the container's NSS module ran on the node"
    assert not Path("/tmp", f"{marker}-inside").exists(), "the container's NSS module ran"


@pytest.mark.parametrize("where", ["rootfs", "emptydir"])
def test_an_nss_module_in_the_container_is_never_loaded(
    client: CRIClient, inst: ContainerdInstance, tmp_path: Path, nss_payload: tuple[Path, str], where: str
) -> None:
    payload, marker = nss_payload
    annotations = {"hotrestart.io/carry-volumes": "data"} if where == "emptydir" else {}
    root = "" if where == "rootfs" else "/data"
    script = _plant(root) + COUNTING
    first = Incarnation(client, inst, tmp_path, f"nss-{where}", annotations=annotations)
    mounts = [(str(payload), "/payload"), (str(first.empty_dir("data")), "/data")]
    first.create(["sh", "-c", script], mounts=mounts)
    assert host.wait_until(lambda: first.counter() >= 3, 10), first.lines()
    assert first.stop().exit_code == 143
    counter = first.state()[0]
    first.remove()
    wait_published(inst)
    again = Incarnation(client, inst, tmp_path, f"nss-{where}", annotations=annotations)
    mounts = [(str(payload), "/payload"), (str(again.empty_dir("data")), "/data")]
    again.create(["sh", "-c", script], mounts=mounts)
    assert again.first()[0] == counter + 1, again.lines()  # restored, files replayed
    conf = client.exec_sync(again.cid, ["stat", "-c", "%u:%g", f"{root}/etc/nsswitch.conf"]).stdout
    assert conf == b"4242:4242\n", conf  # numeric owners carried as they were
    _no_marker(marker)
    again.remove()
    _no_marker(marker)


def _captured_trees(inst: ContainerdInstance, seen: set[str], work: Path) -> list[Path]:
    """Decompress the saved-file archives of every checkpoint not seen yet."""
    out: list[Path] = []
    for ckpt in stored(inst):
        if ckpt.name in seen:
            continue
        try:
            store = Store(str(inst.store))
            found = store.find(ckpt.name)
            assert found is not None and found.manifest is not None
            for entry in found.manifest.files:
                if entry.path.endswith(".tar.zst"):
                    dst = work / f"{ckpt.name}-{entry.path.replace('/', '_')}".removesuffix(".zst")
                    store.restore_file(found, entry.path, str(dst))
                    out.append(dst)
        except (OSError, ValueError, AssertionError, archive.IntegrityError):
            continue  # superseded and removed while read
        seen.add(ckpt.name)
    return out


def _host_bytes_in(tars: list[Path], secret: bytes) -> list[str]:
    found = []
    for path in tars:
        with tarfile.open(path) as tar:
            for m in tar:
                f = tar.extractfile(m) if m.isreg() else None
                if f is not None and secret in f.read():
                    found.append(f"{path.name}:{m.name}")
    return found


def test_swapping_directories_for_links_never_captures_host_files(
    client: CRIClient, inst: ContainerdInstance, tmp_path: Path
) -> None:
    """Periodic and API checkpoints of a container that swaps directories for symlinks to a
    host folder (its path as the node sees it) all through the capture."""
    secret_dir = Path("/tmp", f"hotrestart-host-{uuid.uuid4().hex}")
    secret_dir.mkdir(mode=0o700)
    secret = f"HOST-ONLY-{uuid.uuid4().hex}".encode()
    (secret_dir / "shadow").write_bytes(secret)
    try:
        swap = (
            "cd /; while :; do mkdir -p d/sub; echo container > d/shadow; echo c > d/sub/shadow; "
            f"mv d d.old; ln -s {secret_dir} d; ln -s {secret_dir} d.old/sub2; "
            "rm d; mv d.old d; rm -rf d; done"
        )
        script = f"({swap}) & {COUNTING}"
        pod = Incarnation(client, inst, tmp_path, "swapper-0", annotations={"hotrestart.io/checkpoint-interval": "1s"})
        pod.create(["sh", "-c", script])
        work = tmp_path / "read-back"
        work.mkdir()
        seen: set[str] = set()
        tars: list[Path] = []
        deadline = time.monotonic() + 25 * host.TIME_SCALE
        api = 0
        while time.monotonic() < deadline and len(seen) < 12:
            if not inst.is_1_7 and api < 4:
                client.checkpoint_container(pod.cid, str(tmp_path / f"api-{api}.tar"))
                api += 1
            tars += _captured_trees(inst, seen, work)
            time.sleep(0.2)
        assert len(seen) >= 4, f"only {len(seen)} checkpoints were published"
        assert tars, "no saved files were read back"
        assert not _host_bytes_in(tars, secret)
        links = []
        for path in tars:
            with tarfile.open(path) as tar:
                links += [m.linkname for m in tar if m.issym()]
        # Whatever was caught mid-swap was stored as the link it was, not as its target.
        assert all(link == str(secret_dir) for link in links), links
        pod.remove()
    finally:
        shutil.rmtree(secret_dir, ignore_errors=True)


def test_a_large_root_filesystem_is_kept_with_its_checkpoint(
    client: CRIClient, inst: ContainerdInstance, tmp_path: Path
) -> None:
    """Far more in the root filesystem than in memory: the capture goes to the store's disk,
    not a work area sized from memory, and the checkpoint is kept."""
    script = "dd if=/dev/urandom of=/big bs=1M count=192 2>/dev/null; md5sum /big > /big.md5; " + COUNTING
    first = Incarnation(client, inst, tmp_path, "bigroot-0")
    first.create(["sh", "-c", script])
    assert host.wait_until(lambda: first.counter() >= 3, 30), first.lines()
    assert first.stop().exit_code == 143
    counter = first.state()[0]
    first.remove()
    [ckpt] = wait_published(inst, timeout=60)
    raw = json.loads((ckpt / "manifest.json").read_text())
    rootfs_raw = sum(f["raw_bytes"] for f in raw["files"] if f["path"].startswith("rootfs-diff"))
    assert rootfs_raw >= 192 << 20
    again = Incarnation(client, inst, tmp_path, "bigroot-0")
    again.create(["sh", "-c", script])
    assert again.first()[0] == counter + 1, again.lines()
    assert client.exec_sync(again.cid, ["md5sum", "-c", "/big.md5"], timeout=30).exit_code == 0
    again.remove()


def test_a_work_area_left_by_a_killed_shim_is_swept(
    client: CRIClient, inst: ContainerdInstance, tmp_path: Path
) -> None:
    """A shim SIGKILLed while its dump's tmpfs is mounted: the next shim to start removes it."""
    big = ["sh", "-c", "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo 1 1 1; exec sleep inf"]
    pod = Incarnation(client, inst, tmp_path, "killed-shim-0")
    pod.create(big)
    pod.state(timeout=30)
    inst.ctr("tasks", "kill", "-s", "TERM", pod.cid)
    work = Path("/run/hotrestart/work")
    assert host.wait_until(lambda: any(m.startswith(f"{work}/") for m in host.mounts_under(work)), 10)
    [folder] = [Path(m) for m in host.mounts_under(work) if m.startswith(f"{work}/")]
    shim_pid = int(folder.name.split("-", 1)[0])
    os.kill(shim_pid, signal.SIGKILL)
    assert host.wait_until(lambda: not host.alive(shim_pid), 10)
    assert str(folder) in host.mounts_under(work), "the killed shim left its work area mounted"
    other = Incarnation(client, inst, tmp_path, "next-0")
    other.create()
    assert host.wait_until(lambda: str(folder) not in host.mounts_under(work) and not folder.exists(), 10)
    other.remove()


def test_links_fifos_and_malformed_entries_in_the_store_are_refused(
    client: CRIClient, inst: ContainerdInstance, tmp_path: Path
) -> None:
    """Another writer of the store plants links, FIFOs and malformed manifests where a pod's
    checkpoints live: that pod starts cold without blocking, nothing outside the store is
    touched, the CLI still lists the store, and another pod still restores."""
    from hotrestart.store.entry import identity_key
    from hotrestart.store.manifest import Identity

    counter, _ = run_and_stop(client, inst, tmp_path, "good-0")
    wait_published(inst)
    outside = tmp_path / "outside"
    outside.mkdir(mode=0o755)
    (outside / "keep").write_text("host")
    folder = inst.store / "v1" / "checkpoints" / identity_key(Identity("hot", "bad-0", "app"))
    folder.mkdir(parents=True, mode=0o700)
    os.mkfifo(folder / "20261130T000000Z-aaaaaaaaaaaa")
    (folder / "20261130T000000Z-bbbbbbbbbbbb").symlink_to(outside)
    fifo_manifest = folder / "20261130T000000Z-cccccccccccc"
    fifo_manifest.mkdir(mode=0o700)
    os.mkfifo(fifo_manifest / "manifest.json")
    bad = folder / "20261130T000000Z-dddddddddddd"
    bad.mkdir(mode=0o700)
    (bad / "manifest.json").write_text(json.dumps({"schema": "hotrestart.io/checkpoint/v1", "files": [1]}))
    pod = Incarnation(client, inst, tmp_path, "bad-0")
    t0 = time.monotonic()
    pod.create()
    assert time.monotonic() - t0 < 10, "Start blocked on the store"
    assert pod.first()[0] == 1, pod.lines()
    pod.remove()
    assert (outside / "keep").read_text() == "host" and oct(outside.stat().st_mode & 0o777) == "0o755"
    ls = subprocess.run(
        [sys.executable, "-m", "hotrestart.cli", "--store", str(inst.store), "ls", "-a"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ls.returncode == 0, ls.stderr
    again = Incarnation(client, inst, tmp_path, "good-0")
    again.create()
    assert again.first()[0] == counter + 1, again.lines()
    again.remove()


@pytest.mark.parametrize("restore", ["full", "lazy"])
@pytest.mark.parametrize("bomb", ["frame", "declared"])
def test_a_decompression_bomb_is_refused_before_it_fills_anything(
    client: CRIClient, inst: ContainerdInstance, tmp_path: Path, bomb: str, restore: str
) -> None:
    """A stored page image rewritten by another writer of the store, with hashes that match:
    a small frame that inflates to 256 MiB, or sizes claiming a TiB. Refused, quarantined
    with the reason, and the pod starts cold."""
    import blake3
    import zstandard

    run_and_stop(client, inst, tmp_path, f"bomb-{bomb}")
    [ckpt] = wait_published(inst)
    data = json.loads((ckpt / "manifest.json").read_text())
    entry = max((f for f in data["files"] if f["path"].startswith("images/pages-")), key=lambda f: f["raw_bytes"])
    # The chunk a consistent hostile writer would store: named by the digest of what it inflates to.
    raw = bytes(256 << 20) if bomb == "frame" else bytes(64 << 20)
    digest = blake3.blake3(raw).hexdigest()
    frame = zstandard.ZstdCompressor().compress(raw)
    where = inst.store / "v1" / "chunks" / data["space"] / digest[:2]
    where.mkdir(mode=0o700, parents=True, exist_ok=True)
    (where / digest).write_bytes(frame)
    if bomb == "frame":
        chunks = [{"stored": len(frame), "raw": entry["chunks"][0]["raw"], "digest": digest}]
    else:
        chunks = [{"stored": len(frame), "raw": 64 << 20, "digest": digest}] * (1 << 14)  # 1 TiB
    entry["chunks"] = chunks
    entry["stored_bytes"] = sum(c["stored"] for c in chunks)
    entry["raw_bytes"] = sum(c["raw"] for c in chunks)
    entry["digest"] = blake3.blake3(b"".join(bytes.fromhex(c["digest"]) for c in chunks)).hexdigest()
    (ckpt / "manifest.json").write_text(json.dumps(data))
    # A full restore decompresses the page image and meets the caps; so does a lazy one when
    # the image was one chunk (its size still matches its pagemap), else it refuses sooner.
    again = Incarnation(client, inst, tmp_path, f"bomb-{bomb}", annotations={"hotrestart.io/restore": restore})
    again.create()
    assert again.first()[0] == 1, again.lines()
    [quarantined] = stored(inst, "quarantine")
    reason = (quarantined / "reason.txt").read_text()
    if restore == "full":
        assert ("more than" in reason) or ("allowed here" in reason), reason
    else:
        assert ("does not add up to its size" in reason) or ("more than" in reason), reason
    assert not host.mounts_under("/run/hotrestart/work")
    again.remove()


def test_a_restore_cut_off_by_containerd_gives_its_checkpoint_back(
    containerd_factory: Callable[..., ContainerdInstance], tmp_path: Path
) -> None:
    """containerd dies while StartContainer restores (a large root filesystem keeps the
    restore busy for seconds): the cancelled restore releases its claim instead of leaving
    the checkpoint claimed for retention to delete."""
    node = containerd_factory("2", store=tmp_path / "store")
    cri = node.cri()
    script = "head -c 400000000 /dev/urandom > /big; " + COUNTING
    # The 400 MB root filesystem diff is stored with the stop's dump: as a pod author with a
    # large writable layer would, give the stop-time checkpoint a budget for it (over a minute
    # under emulation) and a grace period beyond that budget.
    policy = {"hotrestart.io/checkpoint-timeout": f"{round(50 * TIME_SCALE)}s"}
    try:
        first = Incarnation(cri, node, tmp_path, "cut-0", annotations=policy)
        first.create(["sh", "-c", script])
        assert host.wait_until(lambda: first.counter() >= 3, 60), first.lines()
        assert first.stop(grace=60).exit_code == 143
        first.remove()
        [ckpt] = wait_published(node, timeout=120)
        again = Incarnation(cri, node, tmp_path, "cut-0", annotations=policy)
        again.create(["sh", "-c", script], start=False)

        def start() -> None:
            with contextlib.suppress(Exception):  # containerd dies under the call
                cri.start_container(again.cid)

        starting = threading.Thread(target=start)
        starting.start()
        assert host.wait_until(lambda: bool(stored(node, "claimed")), 30), "the restore never claimed"
        node.kill_daemon()
        assert host.wait_until(lambda: not stored(node, "claimed") and bool(stored(node)), 20), (
            stored(node, "claimed"),
            stored(node),
        )
        assert [c.name for c in stored(node)] == [ckpt.name]
        starting.join(30)
    finally:
        cri.close()
        problems = [p for p in node.stop() if not p.startswith("CRI teardown")]
        assert not problems, problems
