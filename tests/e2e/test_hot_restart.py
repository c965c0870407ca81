"""Hot restart end to end: pods stopped and created again through containerd's CRI.

The workload keeps its state only in memory: a counter and a checksum over a buffer of
random numbers drawn at start (busybox awk). A restore is proven by the counter going on
from where it stopped with the same checksum; a cold start begins again at 1 with a new one.
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from hotpods import TIME_SCALE, Incarnation, chunk_files, run_and_stop, stored, wait_published

from cri import CRIClient
from testbed import ContainerdInstance, host

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("empty_store")]


def test_stop_and_create_again_continues(client: CRIClient, inst: ContainerdInstance, tmp_path: Path) -> None:
    counter, checksum = run_and_stop(client, inst, tmp_path, "web-0")
    [ckpt] = wait_published(inst)
    assert oct(ckpt.stat().st_mode & 0o777) == "0o700"
    assert all(oct(f.stat().st_mode & 0o777) == "0o600" for f in ckpt.rglob("*") if f.is_file())
    again = Incarnation(client, inst, tmp_path, "web-0")
    again.create()
    time.sleep(0.5)
    first = again.first()
    assert first[0] == counter + 1 and first[1] == checksum, (first, counter, checksum)
    assert host.wait_until(lambda: again.counter() > counter + 1, 10), "it counts on"
    _, s, t = again.state()
    assert s == t == checksum
    assert any(line.startswith("hotrestart: restoring from checkpoint") for line in again.lines())
    assert not stored(inst), "a checkpoint is used once"
    assert not host.mounts_under("/run/hotrestart/work")
    again.remove()


def test_node_move_through_a_shared_store(
    containerd_factory: Callable[..., ContainerdInstance], inst: ContainerdInstance, tmp_path: Path
) -> None:
    shared = tmp_path / "shared-store"
    version = "1.7" if inst.is_1_7 else "2"
    node_a = containerd_factory(version, store=shared)
    node_b = containerd_factory(version, store=shared)
    a, b = node_a.cri(), node_b.cri()
    try:
        counter, checksum = run_and_stop(a, node_a, tmp_path, "db-0")
        wait_published(node_a)
        moved = Incarnation(b, node_b, tmp_path, "db-0")
        moved.create()
        time.sleep(0.5)
        assert moved.first()[:2] == (counter + 1, checksum)
        moved.remove()
    finally:
        for c in (a, b):
            c.remove_all(stop_timeout=0)
            c.close()
        node_a.stop()
        node_b.stop()


def test_changed_command_starts_cold(client: CRIClient, inst: ContainerdInstance, tmp_path: Path) -> None:
    run_and_stop(client, inst, tmp_path, "cmd-0")
    wait_published(inst)
    again = Incarnation(client, inst, tmp_path, "cmd-0")
    again.create(["sh", "-c", "echo changed; sleep inf"])
    assert host.wait_until(lambda: "changed" in again.lines(), 10), again.lines()
    assert any("not compatible" in line and "command" in line for line in again.lines())
    assert len(stored(inst)) == 1, "an incompatible checkpoint is left alone"
    again.remove()
    for c in stored(inst):
        os.system(f"rm -rf {c}")


def test_corrupted_checkpoint_starts_cold(client: CRIClient, inst: ContainerdInstance, tmp_path: Path) -> None:
    run_and_stop(client, inst, tmp_path, "bad-0")
    [ckpt] = wait_published(inst)
    pages = max(chunk_files(inst, ckpt), key=lambda p: p.stat().st_size)
    data = bytearray(pages.read_bytes())
    data[len(data) // 2] ^= 0x01
    pages.write_bytes(bytes(data))
    again = Incarnation(client, inst, tmp_path, "bad-0")
    again.create()
    assert again.first()[0] == 1, "a corrupted checkpoint must never be restored"
    said = "do not match its name"
    assert any("started cold" in line and said in line for line in again.lines()), again.lines()
    [quarantined] = stored(inst, "quarantine")
    assert said in (quarantined / "reason.txt").read_text()
    again.remove()


def test_restore_rejected_by_criu_starts_cold(client: CRIClient, inst: ContainerdInstance, tmp_path: Path) -> None:
    # The process holds a file open in an emptyDir that does not travel: CRIU cannot
    # reopen it in the new pod and refuses the restore.
    first = Incarnation(client, inst, tmp_path, "criu-0")
    scratch = first.empty_dir("scratch")
    hold = ["sh", "-c", "exec 3>/scratch/held; i=0; while :; do i=$((i+1)); echo $i 1 1; sleep 0.1; done"]
    first.create(hold, mounts=[(str(scratch), "/scratch")])
    time.sleep(0.8)
    assert first.stop().exit_code == 143
    first.remove()
    wait_published(inst)
    again = Incarnation(client, inst, tmp_path, "criu-0")
    again.create(hold, mounts=[(str(again.empty_dir("scratch")), "/scratch")])
    assert again.first()[0] == 1
    assert any("started cold" in line for line in again.lines()), again.lines()
    [quarantined] = stored(inst, "quarantine")
    assert (quarantined / "restore.log").exists(), "CRIU's restore log is kept with the quarantined checkpoint"
    again.remove()


def test_opt_out_annotation_stops_the_ordinary_way(client: CRIClient, inst: ContainerdInstance, tmp_path: Path) -> None:
    pod = Incarnation(client, inst, tmp_path, "off-0", annotations={"hotrestart.io/checkpoint": "off"})
    pod.create(["sh", "-c", "trap 'echo bye; exit 0' TERM; while :; do sleep 0.1; done"])
    time.sleep(0.3)
    st = pod.stop()
    assert (st.exit_code, pod.lines()[-1]) == (0, "bye")
    pod.remove()
    assert not stored(inst) and not stored(inst, "staging")


def test_two_pods_race_for_one_checkpoint(client: CRIClient, inst: ContainerdInstance, tmp_path: Path) -> None:
    counter, _ = run_and_stop(client, inst, tmp_path, "race-0")
    wait_published(inst)
    pods = [Incarnation(client, inst, tmp_path, "race-0") for _ in range(2)]
    for p in pods:
        p.create(start=False)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda p: p.client.start_container(p.cid), pods))
    firsts = sorted(p.first()[0] for p in pods)
    assert firsts == [1, counter + 1], firsts
    for p in pods:
        p.remove()


def test_rootfs_and_open_emptydir_files_survive(client: CRIClient, inst: ContainerdInstance, tmp_path: Path) -> None:
    annotations = {"hotrestart.io/carry-volumes": "data"}
    script = (
        "echo from-rootfs > /etc/written; rm /etc/hostname.orig 2>/dev/null; "
        "echo first > /data/log; exec 3>>/data/log; i=0; "
        "while :; do i=$((i+1)); echo line$i >&3; echo $i 1 1; sleep 0.1; done"
    )
    first = Incarnation(client, inst, tmp_path, "files-0", annotations=annotations)
    first.create(["sh", "-c", script], mounts=[(str(first.empty_dir("data")), "/data")])
    time.sleep(0.8)
    assert first.stop().exit_code == 143
    counter = first.state()[0]
    first.remove()
    wait_published(inst)
    again = Incarnation(client, inst, tmp_path, "files-0", annotations=annotations)
    data = again.empty_dir("data")
    again.create(["sh", "-c", script], mounts=[(str(data), "/data")])
    time.sleep(0.5)
    assert again.first()[0] == counter + 1, again.lines()
    assert client.exec_sync(again.cid, ["cat", "/etc/written"]).stdout == b"from-rootfs\n"
    log_lines = (data / "log").read_text().split()
    assert log_lines[0] == "first" and f"line{counter + 2}" in log_lines, log_lines[-3:]
    again.remove()


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def test_listener_serves_at_the_new_address(client: CRIClient, inst: ContainerdInstance, tmp_path: Path) -> None:
    server = ["sh", "-c", "mkdir -p /www && echo served > /www/index.html && exec httpd -f -p 8080 -h /www"]
    first = Incarnation(client, inst, tmp_path, "net-0")
    first.create(server)
    old_ip = client.pod_sandbox_status(first.pod).network.ip
    assert host.wait_until(lambda: _try(f"http://{old_ip}:8080/") == "served\n", 10)
    assert first.stop().exit_code == 143
    first.remove()
    wait_published(inst)
    again = Incarnation(client, inst, tmp_path, "net-0")
    again.create(server)
    new_ip = client.pod_sandbox_status(again.pod).network.ip
    assert new_ip != old_ip
    assert host.wait_until(lambda: _try(f"http://{new_ip}:8080/") == "served\n", 10)
    assert any(line.startswith("hotrestart: restoring") for line in again.lines()), "it must be a restore"
    again.remove()


def _try(url: str) -> str:
    try:
        return _get(url)
    except OSError:
        return ""


def test_sigkill_during_checkpoint_leaves_nothing(client: CRIClient, inst: ContainerdInstance, tmp_path: Path) -> None:
    big = ["sh", "-c", "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo 1 1 1; exec sleep inf"]
    pod = Incarnation(client, inst, tmp_path, "kill-0")
    pod.create(big)
    pod.state(timeout=30)
    inst.ctr("tasks", "kill", "-s", "TERM", pod.cid)
    pending = inst.store / "v1" / "pending"
    assert host.wait_until(lambda: pending.exists() and any(pending.iterdir()), 10)
    inst.ctr("tasks", "kill", "-s", "KILL", pod.cid)
    st = pod.client.wait_container_exit(pod.cid, timeout=30)
    assert st.exit_code == 137
    pod.remove()

    # The shim finishes its clean-up after the container is reported gone: wait for it.
    def left() -> list[str]:
        found = [str(p) for state in ("checkpoints", "staging", "claimed") for p in stored(inst, state)]
        return found + host.mounts_under("/run/hotrestart/work")

    assert host.wait_until(lambda: not left(), 30), left()


def test_restored_container_that_keeps_dying_is_not_restored_again(
    client: CRIClient, inst: ContainerdInstance, tmp_path: Path
) -> None:
    # Counts until a flag in a host folder appears, then exits: the first run is stopped
    # (checkpointed) with no flag, and every restore after the flag is set dies at once, as a
    # crash loop would. No race between the first stop and the workload's own end.
    flags = tmp_path / "flags"
    flags.mkdir()
    loop = "i=0; while true; do i=$((i+1)); echo $i 1 1; [ -e /flags/die ] && exit 0; sleep 0.1; done"
    command, mounts = ["sh", "-c", loop], [(str(flags), "/flags", True)]
    first = Incarnation(client, inst, tmp_path, "loop-0")
    first.create(command, mounts=mounts)
    first.state()
    assert first.stop().exit_code == 143
    counter = first.state()[0]
    first.remove()
    wait_published(inst)
    (flags / "die").touch()
    pod = Incarnation(client, inst, tmp_path, "loop-0")

    def start(attempt: int) -> None:
        # Each of these dies as soon as it runs, often before StartContainer has returned:
        # containerd may report it exited before a client ever sees it running.
        pod.create(command, mounts=mounts, attempt=attempt, start=False)
        client.start_container(pod.cid)

    for attempt in range(3):
        start(attempt)
        assert pod.first()[0] == counter + 1, f"restore {attempt + 1} continues from the checkpoint"
        assert client.wait_container_exit(pod.cid, timeout=30 * TIME_SCALE).exit_code == 0
        assert host.wait_until(lambda: bool(stored(inst) or stored(inst, "quarantine")), 10)
    assert not stored(inst) and len(stored(inst, "quarantine")) == 1
    assert "died within" in (stored(inst, "quarantine")[0] / "reason.txt").read_text()
    start(3)
    assert pod.first()[0] == 1, "after three early deaths the container starts cold"
    # As a kubelet does, remove it once it has exited: a stop that races containerd's own
    # handling of the exit can return before the exit is recorded.
    assert client.wait_container_exit(pod.cid, timeout=30 * TIME_SCALE).exit_code == 0
    pod.remove()


def test_a_full_store_loses_nothing_and_the_pod_starts_cold(
    client: CRIClient, inst: ContainerdInstance, tmp_path: Path
) -> None:
    v1 = inst.store / "v1"
    v1.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "hotrestart-full", str(v1)], check=True)
    try:
        # The store cannot keep the dump: none is taken (the processes would be gone with
        # nowhere to keep them), and the application gets its signal.
        pod = Incarnation(client, inst, tmp_path, "full-0")
        pod.create(["sh", "-c", HANDLES_TERM + "while true; do echo 1 1 1; sleep 0.1; done"])
        stops_the_ordinary_way(pod, inst, "the store has")
        again = Incarnation(client, inst, tmp_path, "full-0")
        again.create()
        assert again.first()[0] == 1, "no checkpoint: the pod starts cold"
        assert not any(line.startswith("hotrestart: restoring") for line in again.lines())
        again.remove()
    finally:
        subprocess.run(["umount", "-l", str(v1)], check=False)


HANDLES_TERM = "trap 'echo got TERM; exit 7' TERM; "


def stops_the_ordinary_way(pod: Incarnation, inst: ContainerdInstance, logged: str) -> None:
    """The stop delivered the signal, which the application handled itself (its own exit
    code, its own last words), and no checkpoint or work folder was left behind."""
    pod.state()
    assert pod.stop().exit_code == 7
    assert "got TERM" in pod.lines()
    assert host.wait_until(lambda: logged in inst.read_log(), 10), inst.log_tail()
    assert not stored(inst) and not stored(inst, "staging") and not stored(inst, "pending")
    assert not host.mounts_under("/run/hotrestart/work")
    pod.remove()


def test_a_stop_without_time_for_a_checkpoint_delivers_the_signal(
    client: CRIClient, inst: ContainerdInstance, tmp_path: Path
) -> None:
    # A budget shorter than any dump (under half a second, none is tried).
    pod = Incarnation(client, inst, tmp_path, "slow-0", annotations={"hotrestart.io/checkpoint-timeout": "1ms"})
    pod.create(["sh", "-c", HANDLES_TERM + "while true; do echo 1 1 1; sleep 0.1; done"])
    stops_the_ordinary_way(pod, inst, "delivering signal 15 the ordinary way")


def test_a_dump_criu_refuses_delivers_the_signal(client: CRIClient, inst: ContainerdInstance, tmp_path: Path) -> None:
    # A deleted file held open is saved by CRIU as a "ghost" only up to 1 MiB: this one makes
    # the dump itself fail, part-way, while the page images are being followed.
    ghost = (
        "head -c 3000000 /dev/zero > /tmp/ghost; exec 3</tmp/ghost; rm /tmp/ghost; "
        "while true; do echo 1 1 1; sleep 0.1; done"
    )
    pod = Incarnation(client, inst, tmp_path, "ghost-0")
    pod.create(["sh", "-c", HANDLES_TERM + ghost])
    stops_the_ordinary_way(pod, inst, "checkpoint on stop failed")


def test_a_terminal_container_continues_on_its_new_terminal(
    client: CRIClient, inst: ContainerdInstance, tmp_path: Path
) -> None:
    counter, checksum = run_and_stop(client, inst, tmp_path, "tty-0", tty=True)
    wait_published(inst)
    again = Incarnation(client, inst, tmp_path, "tty-0")
    again.create(tty=True)
    time.sleep(0.5)
    # The restored process writes to the new pod's terminal, and so into its log.
    assert again.first()[:2] == (counter + 1, checksum)
    n, s, _ = again.state()
    assert n > counter + 1 and s == checksum
    again.remove()
