"""The verbs that change containers: create, start, restore, checkpoint, kill, delete, pause, resume, update, exec."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import sys

from .cli import Call
from .errors import RuncError
from .processes import process_spec, read_spec, spawn
from .state import (
    container_dir,
    live_pids,
    load,
    new_container,
    refuse_existing,
    save,
    signal_all,
    wait_dead,
    write_pid_file,
)

START_TIMEOUT = 5.0


def do_create(call: Call) -> int:
    root, cid = call.root, call.cid()
    if call.has("--console-socket"):
        raise RuncError("the fake runc has no terminals (--console-socket)")
    bundle = call.flag("--bundle", "-b") or os.getcwd()
    refuse_existing(root, cid)
    args, env, cwd = process_spec(read_spec(bundle).get("process") or {})
    os.makedirs(container_dir(root, cid), mode=0o711, exist_ok=True)
    fifo = os.path.join(container_dir(root, cid), "exec.fifo")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(fifo)
    os.mkfifo(fifo, 0o600)
    init = spawn(args, env, cwd, fifo)
    save(root, new_container(call, cid, bundle, init, "created"))
    write_pid_file(call.flag("--pid-file"), init["pid"])
    return 0


def do_start(call: Call) -> int:
    root, cid = call.root, call.cid()
    state = load(root, cid)
    if state["status"] == "stopped":
        raise RuncError("cannot start a container that has stopped")
    if state["status"] != "created":
        raise RuncError("cannot start an already running container")
    fifo = os.path.join(container_dir(root, cid), "exec.fifo")
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        ready, _, _ = select.select([fd], [], [], START_TIMEOUT)
        if not ready or not os.read(fd, 1):
            raise RuncError("container init never reached the exec FIFO")
    finally:
        os.close(fd)
    os.unlink(fifo)
    state["status"] = "running"
    save(root, state)
    return 0


def do_restore(call: Call) -> int:
    root, cid = call.root, call.cid()
    if call.has("--console-socket"):
        raise RuncError("the fake runc has no terminals (--console-socket)")
    image = call.flag("--image-path")
    if not image or not os.path.exists(os.path.join(image, "inventory.img")):
        raise RuncError(f"criu failed: type RESTORE errno 0: no inventory.img in {image or '(none)'}")
    bundle = call.flag("--bundle", "-b") or os.getcwd()
    refuse_existing(root, cid)
    args, env, cwd = process_spec(read_spec(bundle).get("process") or {})
    os.makedirs(container_dir(root, cid), mode=0o711, exist_ok=True)
    init = spawn(args, env, cwd)
    state = new_container(call, cid, bundle, init, "running")
    state["restored_from"] = image
    save(root, state)
    write_pid_file(call.flag("--pid-file"), init["pid"])
    return 0


def do_checkpoint(call: Call) -> int:
    root, cid = call.root, call.cid()
    state = load(root, cid)
    if state["status"] not in ("running", "paused"):
        raise RuncError("container is not running")
    image = call.flag("--image-path")
    if not image:
        raise RuncError("--image-path is required")
    work = call.flag("--work-path") or image
    os.makedirs(image, exist_ok=True)
    os.makedirs(work, exist_ok=True)
    pids = live_pids(state)
    with open(os.path.join(work, "dump.log"), "w") as f:
        f.write(f"fake criu: dumping {pids}\n")
    with open(os.path.join(image, "inventory.img"), "wb") as f:
        f.write(b"fake-criu-inventory\n")
    with open(os.path.join(image, "pstree.img"), "w") as f:
        json.dump({"pids": pids}, f)
    with open(os.path.join(image, "pages-1.img"), "wb") as f:
        f.write(bytes(range(256)) * 16)
    if not call.has("--leave-running"):
        # CRIU ends the dumped tree, and runc then destroys the container.
        signal_all(pids, signal.SIGKILL)
        wait_dead(state)
        shutil.rmtree(container_dir(root, cid))
    return 0


def do_kill(call: Call) -> int:
    root, cid = call.root, call.cid()
    sig = _signal_number(call.args[1] if len(call.args) > 1 else "SIGTERM")
    state = load(root, cid)
    if call.has("--all", "-a"):
        signal_all(live_pids(state), sig)
        return 0
    if state["status"] == "stopped":
        raise RuncError("container not running")
    signal_all([int(state["init"]["pid"])], sig)
    return 0


def _signal_number(text: str) -> int:
    if text.isdigit():
        return int(text)
    name = text.upper()
    try:
        return int(signal.Signals[name if name.startswith("SIG") else "SIG" + name])
    except KeyError:
        raise RuncError(f"unknown signal {text!r}") from None


def do_delete(call: Call) -> int:
    root, cid = call.root, call.cid()
    state = load(root, cid)
    status = state["status"]
    if status in ("running", "paused") and not call.has("--force", "-f"):
        raise RuncError(f"cannot delete container {cid} that is not stopped: {status}")
    # A created container is destroyed without --force, as runc does.
    pids = live_pids(state)
    signal_all(pids, signal.SIGKILL)
    signal_all(pids, signal.SIGCONT)
    wait_dead(state)
    shutil.rmtree(container_dir(root, cid))
    return 0


def do_pause(call: Call) -> int:
    root, cid = call.root, call.cid()
    state = load(root, cid)
    if state["status"] != "running":
        raise RuncError("container not running")
    signal_all(live_pids(state), signal.SIGSTOP)
    state["status"] = "paused"
    save(root, state)
    return 0


def do_resume(call: Call) -> int:
    root, cid = call.root, call.cid()
    state = load(root, cid)
    if state["status"] != "paused":
        raise RuncError("container not paused")
    signal_all(live_pids(state), signal.SIGCONT)
    state["status"] = "running"
    save(root, state)
    return 0


def do_update(call: Call) -> int:
    root, cid = call.root, call.cid()
    state = load(root, cid)
    source = call.flag("--resources", "-r")
    if source == "-":
        text = sys.stdin.read()
    elif source:
        with open(source) as f:
            text = f.read()
    else:
        raise RuncError("the fake runc updates only with --resources")
    try:
        resources = json.loads(text)
    except ValueError as exc:
        raise RuncError(f"unable to parse resources: {exc}") from None
    if not isinstance(resources, dict):
        raise RuncError("unable to parse resources: not an object")
    state["resources"] = resources
    save(root, state)
    return 0


def do_exec(call: Call) -> int:
    root, cid = call.root, call.cid()
    if call.has("--console-socket", "--tty", "-t"):
        raise RuncError("the fake runc has no terminals (--console-socket)")
    state = load(root, cid)
    if state["status"] == "paused":
        raise RuncError("cannot exec in a paused container")
    if state["status"] != "running":
        raise RuncError("cannot exec in a stopped container")
    path = call.flag("--process", "-p")
    if not path:
        raise RuncError("the fake runc executes only --process specs")
    with open(path) as f:
        args, env, cwd = process_spec(json.load(f))
    proc = spawn(args, env, cwd)
    state["execs"].append(proc)
    save(root, state)
    write_pid_file(call.flag("--pid-file"), proc["pid"])
    if call.has("--detach", "-d"):
        return 0
    _, status = os.waitpid(proc["pid"], 0)
    return os.waitstatus_to_exitcode(status) % 256
