"""Lazy restore: the restored process runs before its memory is back, its pages arriving on
demand and in the background from the store; a page source that fails part-way kills the
process rather than let it run on memory it did not have.

The workload is hack/memhog.c: a checksum over all of its memory, printed every second, so
any page that came back wrong, or not at all, shows as a different checksum.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hotpods import Incarnation, chunk_files, run_memhog, stored, wait_published

from cri import CONTAINER_EXITED
from testbed import ContainerdInstance, host

pytestmark = [pytest.mark.e2e]


@pytest.fixture(scope="module")
def inst(containerd: ContainerdInstance) -> ContainerdInstance:
    return containerd


def _rows(pod: Incarnation) -> list[tuple[int, int]]:
    rows = [line.split() for line in pod.lines() if not line.startswith("hotrestart:")]
    return [(int(r[0]), int(r[1])) for r in rows if len(r) == 3 and all(x.isdigit() for x in r)]


def _shim_lines(inst: ContainerdInstance, word: str) -> list[str]:
    """The node's log lines that mention `word`, for a failed assertion to show."""
    lines = inst.log_path.read_text(errors="replace").splitlines() if inst.log_path.exists() else []
    return [line for line in lines if word in line][-20:]


def _stopped_with_checkpoint(
    client: Any, inst: ContainerdInstance, tmp: Path, memhog: Path, name: str, mib: int
) -> tuple[int, int]:
    pod = Incarnation(client, inst, tmp, name)
    run_memhog(pod, memhog, mib)
    pod.state(timeout=60)
    counter, checksum, _ = pod.state()
    # A kubelet's default grace (30 s). The dump's budget is the pod's checkpoint-timeout (10 s by
    # default); a grace no longer than that would let the SIGKILL that ends it, which rightly
    # wins over a dump in progress, cut a GiB's dump still within its budget on a busy node.
    st = pod.stop(grace=30)
    assert st.exit_code == 143, _shim_lines(inst, "checkpoint")
    wait_published(inst)
    pod.remove()
    return counter, checksum


@pytest.mark.parametrize("mode", ["lazy", "full"])
def test_a_restored_process_runs_before_its_memory_is_back_and_continues(
    client: Any, inst: ContainerdInstance, tmp_path: Path, memhog: Path, empty_store: None, mode: str
) -> None:
    name = f"lazy-{mode}-0"
    counter, checksum = _stopped_with_checkpoint(client, inst, tmp_path, memhog, name, 512)
    annotations = {"hotrestart.io/restore": mode}
    again = Incarnation(client, inst, tmp_path, name, annotations=annotations)
    run_memhog(again, memhog, 512)
    n, same, _ = again.state(timeout=60)
    assert same == checksum and n > counter, (counter, checksum, again.lines()[:5])
    note = again.lines()[0]
    assert note.startswith("hotrestart: restoring from checkpoint"), note
    assert ("memory on demand" in note) == (mode == "lazy"), note
    assert all(c == checksum for _, c in _rows(again)), "every row sums the same memory"
    if mode == "lazy":
        log = inst.read_log()
        assert host.wait_until(lambda: again.cid in inst.read_log() and "fully resident" in inst.read_log(), 30), log[
            -2000:
        ]
    again.remove()


def _restored_without_a_chunk(
    client: Any, inst: ContainerdInstance, tmp: Path, memhog: Path, name: str
) -> tuple[Incarnation, int] | None:
    """A checkpoint of `name` with a chunk of its page image gone, restored; None (after
    checking what a full restore must do instead) when the restore was not a lazy one."""
    _, checksum = _stopped_with_checkpoint(client, inst, tmp, memhog, name, 256)
    (ckpt,) = stored(inst)
    chunks = chunk_files(inst, ckpt)
    assert len(chunks) > 8, "the page image is cut into chunks"
    # A chunk well inside the big region: what CRIU restores itself is in the first ones.
    chunks[len(chunks) // 2].unlink()
    again = Incarnation(client, inst, tmp, name)
    run_memhog(again, memhog, 256)
    assert host.wait_until(lambda: bool(again.lines()), 30), "the container never wrote a line"
    if "memory on demand" in again.lines()[0]:
        return again, checksum
    # The lazy-pages daemon did not start in time (the shim says why) and the restore was a
    # full one, which finds the missing chunk before the process runs: a cold start.
    fallback = [line for line in inst.read_log().splitlines() if f"{again.cid}: restoring in full" in line]
    assert fallback, (again.lines()[:3], inst.read_log()[-3000:])
    failed = r"hotrestart: restore from checkpoint \S+ failed \(.*chunk.*\); started cold"
    assert re.fullmatch(failed, again.lines()[0]), again.lines()[0]
    assert again.first()[0] == 1, "a failed restore starts cold"
    assert host.wait_until(lambda: len(stored(inst, "quarantine")) == 1, 10), "the checkpoint is set aside"
    again.remove()
    for entry in stored(inst, "quarantine"):
        shutil.rmtree(entry)
    return None


def test_a_page_source_failing_part_way_kills_the_process_and_never_serves_wrong_memory(
    client: Any, inst: ContainerdInstance, tmp_path: Path, memhog: Path, empty_store: None
) -> None:
    # A loaded machine can make the lazy-pages daemon miss its start (then the restore is
    # a full one): the scenario runs again, and must be lazy by the third time.
    for attempt in range(3):
        name = f"lazy-broken-{attempt}"
        restored = _restored_without_a_chunk(client, inst, tmp_path, memhog, name)
        if restored is not None:
            break
    else:
        pytest.fail("three restores in a row were not lazy (see the shim's 'restoring in full' lines)")
    again, checksum = restored
    assert host.wait_until(lambda: client.container_status(again.cid).state == CONTAINER_EXITED, 30), again.lines()
    status = client.container_status(again.cid)
    assert status.exit_code == 137, (status.exit_code, again.lines())
    assert all(c == checksum for _, c in _rows(again)), "no row ever sums wrong memory"
    (quarantined,) = stored(inst, "quarantine")
    reason = (quarantined / "reason.txt").read_text()
    assert re.search(r"lazy restore failed: the page source failed", reason), reason
    assert json.loads((quarantined / "manifest.json").read_text())["identity"]["pod"] == name
    again.remove()
    cold = Incarnation(client, inst, tmp_path, name)
    run_memhog(cold, memhog, 256)
    assert cold.first()[0] == 1, "the next incarnation starts cold"
    cold.remove()


def _processes(*argv: bytes) -> list[int]:
    """Processes whose command line holds the arguments `argv` in this order."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                args = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(args[i : i + len(argv)] == list(argv) for i in range(len(args))):
                found.append(int(proc.name))
    return found


_PAGE_SERVER = (b"-m", b"hotrestart.checkpoint.pageserver")


@contextlib.contextmanager
def _page_server_slowed() -> Iterator[list[int]]:
    """Run the page server a tenth of the time (SIGSTOP, SIGCONT) from when it appears, so
    that the restore's memory is still arriving when the test kills its page source, however
    fast this machine would serve it (a GiB is resident in about two seconds on an idle one).
    Stopped outright from its start, it holds the restore itself up past the CRI deadline.
    Yields the pids slowed so far."""
    slowed: list[int] = []
    done = threading.Event()

    def signal_all(sig: int) -> None:
        for pid in slowed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def watch() -> None:
        while not done.is_set():
            slowed.extend(pid for pid in _processes(*_PAGE_SERVER) if pid not in slowed)
            signal_all(signal.SIGSTOP)
            if done.wait(0.09):
                break
            signal_all(signal.SIGCONT)
            done.wait(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield slowed
    finally:
        done.set()
        watcher.join()
        signal_all(signal.SIGCONT)


@pytest.mark.parametrize(
    "killed",
    [(b"lazy-pages", b"--images-dir"), _PAGE_SERVER],
    ids=["daemon", "page-server"],
)
def test_the_page_source_killed_part_way_kills_the_process_and_never_serves_zero_pages(
    client: Any, inst: ContainerdInstance, tmp_path: Path, memhog: Path, empty_store: None, killed: tuple[bytes, ...]
) -> None:
    """Without the shim's hold on the userfaultfds, the kernel would answer the remaining
    faults with zero pages once the daemon is gone, and the checksum would change."""
    with _page_server_slowed() as slowed:
        # A loaded machine can make the lazy-pages daemon miss its start (then the restore
        # is a full one, and has nothing to kill): the scenario runs again, lazy by the third.
        for attempt in range(3):
            name = f"lazy-killed-{attempt}"
            _, checksum = _stopped_with_checkpoint(client, inst, tmp_path, memhog, name, 1024)
            again = Incarnation(client, inst, tmp_path, name)
            run_memhog(again, memhog, 1024)
            assert host.wait_until(lambda pod=again: bool(pod.lines()), 30), "the container never wrote a line"
            if "memory on demand" in again.lines()[0]:
                break
            assert [line for line in inst.read_log().splitlines() if f"{again.cid}: restoring in full" in line]
            again.remove()
        else:
            pytest.fail("three restores in a row were not lazy (see the shim's 'restoring in full' lines)")
        assert slowed, "the lazy restore's page server was seen"
        victims = _processes(*killed)
        assert victims, "the restore's memory is still arriving"
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        assert host.wait_until(lambda: client.container_status(again.cid).state == CONTAINER_EXITED, 30), again.lines()
    assert client.container_status(again.cid).exit_code == 137, again.lines()
    assert all(c == checksum for _, c in _rows(again)), "no row ever sums wrong memory"
    reason = (stored(inst, "quarantine")[0] / "reason.txt").read_text()
    assert re.search(r"lazy restore failed: the (lazy-pages daemon exited|page source failed)", reason), reason
    # The guard itself: the daemon's death alone does not let the faults go.
    assert re.search(r"holding [1-9][0-9]* userfaultfd\(s\) of the lazy-pages daemon", inst.read_log())
    again.remove()
