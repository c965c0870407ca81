"""A stand-in for the runc binary: the verbs and flags the shim uses, with real processes, no root.

Installed as an executable named `runc` (see `fakes.FakeRunc`), this program keeps each
container's state as files under `--root`, and its processes are real: `create` forks an init
that waits on `<root>/<id>/exec.fifo` the way runc's does, then execs `process.args` from the
bundle's config.json; `start` opens the FIFO and so releases it. The init stays a child of this
program, which exits, so it is re-parented to the nearest child subreaper (the shim under test).
Processes inherit this program's stdin, stdout and stderr, as they do runc's.

The folder the program is installed in is its home: every call is appended to
`calls.jsonl` there; `fail/<verb>` (JSON {"msg": ..., "code": ...}) makes that verb log the
message to `--log` as runc does ({"level":"error","msg":...}) and exit with the code;
`delay/<verb>` (seconds) makes it sleep before doing anything. `--version` is the verb `version`.

It needs only the standard library: it runs with `python -S`, for a fast start.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import sys
import time
from typing import Any

VERSION = "1.2.5"
SPEC_VERSION = "1.2.0"
START_TIMEOUT = 5.0

# verb -> flag -> takes a value. Flags not listed are refused, as urfave/cli refuses them.
VERB_FLAGS: dict[str, dict[str, bool]] = {
    "create": {
        "--bundle": True,
        "-b": True,
        "--pid-file": True,
        "--console-socket": True,
        "--no-pivot": False,
        "--no-new-keyring": False,
        "--preserve-fds": True,
    },
    "start": {},
    "restore": {
        "--detach": False,
        "-d": False,
        "--no-subreaper": False,
        "--image-path": True,
        "--bundle": True,
        "-b": True,
        "--pid-file": True,
        "--work-path": True,
        "--parent-path": True,
        "--console-socket": True,
        "--no-pivot": False,
        "--tcp-established": False,
        "--ext-unix-sk": False,
        "--shell-job": False,
        "--file-locks": False,
        "--manage-cgroups-mode": True,
    },
    "checkpoint": {
        "--image-path": True,
        "--work-path": True,
        "--parent-path": True,
        "--leave-running": False,
        "--tcp-established": False,
        "--ext-unix-sk": False,
        "--shell-job": False,
        "--file-locks": False,
        "--empty-ns": True,
        "--manage-cgroups-mode": True,
    },
    "kill": {"--all": False, "-a": False},
    "delete": {"--force": False, "-f": False},
    "pause": {},
    "resume": {},
    "update": {"--resources": True, "-r": True},
    "ps": {"--format": True, "-f": True},
    "events": {"--stats": False, "--interval": True},
    "exec": {
        "--process": True,
        "-p": True,
        "--detach": False,
        "-d": False,
        "--pid-file": True,
        "--console-socket": True,
        "--tty": False,
        "-t": False,
    },
    "state": {},
    "features": {},
}
GLOBAL_FLAGS = {
    "--root": True,
    "--log": True,
    "--log-format": True,
    "--systemd-cgroup": False,
    "--criu": True,
    "--debug": False,
}


class RuncError(Exception):
    """What runc would log at level error before exiting 1."""


class Call:
    def __init__(self, argv: list[str]) -> None:
        self.globals, rest = _parse_flags(argv, GLOBAL_FLAGS)
        self.flags: dict[str, list[str]] = {}
        self.args: list[str] = []
        if rest in (["--version"], ["-v"]):
            self.verb = "version"
            return
        if not rest:
            raise RuncError("no verb given")
        self.verb = rest[0]
        if self.verb not in VERB_FLAGS:
            raise RuncError(f"no such command: {self.verb}")
        self.flags, self.args = _parse_flags(rest[1:], VERB_FLAGS[self.verb])

    def flag(self, *names: str) -> str:
        for name in names:
            if name in self.flags:
                return self.flags[name][-1]
        return ""

    def has(self, *names: str) -> bool:
        return any(name in self.flags for name in names)

    @property
    def root(self) -> str:
        root = self.globals.get("--root", [""])[-1]
        if not root:
            # The default would be the host's /run/runc: never touch it from a test.
            raise RuncError("the fake runc needs --root")
        return root

    def cid(self) -> str:
        if not self.args:
            raise RuncError(f"{self.verb}: container id cannot be empty")
        return self.args[0]


def _parse_flags(argv: list[str], known: dict[str, bool]) -> tuple[dict[str, list[str]], list[str]]:
    """Flags up to the first positional argument (as urfave/cli parses them), and the rest."""
    flags: dict[str, list[str]] = {}
    i = 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "-":
        name, eq, value = argv[i].partition("=")
        if known is GLOBAL_FLAGS and name in ("--version", "-v"):
            break
        if name not in known:
            raise RuncError(f"flag provided but not defined: {name}")
        if known[name] and not eq:
            i += 1
            if i >= len(argv):
                raise RuncError(f"flag needs an argument: {name}")
            value = argv[i]
        flags.setdefault(name, []).append(value)
        i += 1
    return flags, argv[i:]


# -- state on disk ------------------------------------------------------------------------------


def _dir(root: str, cid: str) -> str:
    if not cid or "/" in cid or cid in (".", ".."):
        raise RuncError(f"invalid container id {cid!r}")
    return os.path.join(root, cid)


def _load(root: str, cid: str) -> dict[str, Any]:
    try:
        with open(os.path.join(_dir(root, cid), "state.json")) as f:
            state: dict[str, Any] = json.load(f)
    except FileNotFoundError:
        raise RuncError("container does not exist") from None
    state["status"] = _status(state)
    return state


def _save(root: str, state: dict[str, Any]) -> None:
    path = os.path.join(_dir(root, state["id"]), "state.json")
    with open(path + ".tmp", "w") as f:
        json.dump(state, f)
    os.replace(path + ".tmp", path)


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks ("" if it is gone or a zombie): tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return ""
    return "" if fields[0] in ("Z", "X") else fields[19]


def _alive(proc: dict[str, Any]) -> bool:
    return bool(proc["start"]) and _start_time(int(proc["pid"])) == proc["start"]


def _status(state: dict[str, Any]) -> str:
    if state["status"] != "stopped" and not _alive(state["init"]):
        return "stopped"
    return str(state["status"])


def _live_pids(state: dict[str, Any]) -> list[int]:
    return [int(p["pid"]) for p in [state["init"], *state["execs"]] if _alive(p)]


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _wait_dead(state: dict[str, Any], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while _live_pids(state) and time.monotonic() < deadline:
        time.sleep(0.005)


def _write_pid_file(path: str, pid: int) -> None:
    if not path:
        return
    with open(path + ".tmp", "w") as f:
        f.write(str(pid))
    os.replace(path + ".tmp", path)


# -- processes ----------------------------------------------------------------------------------


def _process_spec(process: dict[str, Any]) -> tuple[list[str], dict[str, str], str]:
    args = [str(a) for a in process.get("args") or []]
    if not args:
        raise RuncError("args must not be empty")
    env = dict(e.split("=", 1) for e in process.get("env") or [] if "=" in e)
    env.setdefault("PATH", os.environ.get("PATH", "/usr/bin:/bin"))
    if shutil.which(args[0], path=env["PATH"]) is None:
        raise RuncError(
            f'runc create failed: unable to start container process: exec: "{args[0]}": '
            "executable file not found in $PATH"
        )
    return args, env, str(process.get("cwd") or "")


def _close_inherited_fds() -> None:
    for name in os.listdir("/proc/self/fd"):
        if int(name) > 2:
            with contextlib.suppress(OSError):
                os.close(int(name))


def _spawn(args: list[str], env: dict[str, str], cwd: str, fifo: str = "") -> dict[str, Any]:
    """Fork a process that (after the exec FIFO, if given) becomes `args`; it keeps our stdio."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 127
        try:
            _close_inherited_fds()  # the root's lock above all: a waiting init must not hold it
            os.setsid()
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE):
                signal.signal(sig, signal.SIG_DFL)
            if fifo:
                fd = os.open(fifo, os.O_WRONLY)  # blocks until `start` opens the other end
                os.write(fd, b"0")
                os.close(fd)
            if cwd:
                os.chdir(cwd)
            os.execvpe(args[0], args, env)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.write(2, f"fake runc: {args[0]}: {exc}\n".encode())
        finally:
            os._exit(code)
    return {"pid": pid, "start": _start_time(pid)}


def _read_spec(bundle: str) -> dict[str, Any]:
    try:
        with open(os.path.join(bundle, "config.json")) as f:
            spec: dict[str, Any] = json.load(f)
    except FileNotFoundError:
        raise RuncError(f"JSON specification file config.json not found in {bundle}") from None
    return spec


def _new_container(call: Call, cid: str, bundle: str, init: dict[str, Any], status: str) -> dict[str, Any]:
    return {
        "id": cid,
        "bundle": bundle,
        "status": status,
        "init": init,
        "execs": [],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "resources": {},
        "systemd_cgroup": "--systemd-cgroup" in call.globals,
    }


def _refuse_existing(root: str, cid: str) -> None:
    if os.path.exists(os.path.join(_dir(root, cid), "state.json")):
        raise RuncError(f"container with id exists: {cid}")


# -- verbs --------------------------------------------------------------------------------------


def do_create(call: Call) -> int:
    root, cid = call.root, call.cid()
    if call.has("--console-socket"):
        raise RuncError("the fake runc has no terminals (--console-socket)")
    bundle = call.flag("--bundle", "-b") or os.getcwd()
    _refuse_existing(root, cid)
    args, env, cwd = _process_spec(_read_spec(bundle).get("process") or {})
    os.makedirs(_dir(root, cid), mode=0o711, exist_ok=True)
    fifo = os.path.join(_dir(root, cid), "exec.fifo")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(fifo)
    os.mkfifo(fifo, 0o600)
    init = _spawn(args, env, cwd, fifo)
    _save(root, _new_container(call, cid, bundle, init, "created"))
    _write_pid_file(call.flag("--pid-file"), init["pid"])
    return 0


def do_start(call: Call) -> int:
    root, cid = call.root, call.cid()
    state = _load(root, cid)
    if state["status"] == "stopped":
        raise RuncError("cannot start a container that has stopped")
    if state["status"] != "created":
        raise RuncError("cannot start an already running container")
    fifo = os.path.join(_dir(root, cid), "exec.fifo")
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        ready, _, _ = select.select([fd], [], [], START_TIMEOUT)
        if not ready or not os.read(fd, 1):
            raise RuncError("container init never reached the exec FIFO")
    finally:
        os.close(fd)
    os.unlink(fifo)
    state["status"] = "running"
    _save(root, state)
    return 0


def do_restore(call: Call) -> int:
    root, cid = call.root, call.cid()
    if call.has("--console-socket"):
        raise RuncError("the fake runc has no terminals (--console-socket)")
    image = call.flag("--image-path")
    if not image or not os.path.exists(os.path.join(image, "inventory.img")):
        raise RuncError(f"criu failed: type RESTORE errno 0: no inventory.img in {image or '(none)'}")
    bundle = call.flag("--bundle", "-b") or os.getcwd()
    _refuse_existing(root, cid)
    args, env, cwd = _process_spec(_read_spec(bundle).get("process") or {})
    os.makedirs(_dir(root, cid), mode=0o711, exist_ok=True)
    init = _spawn(args, env, cwd)
    state = _new_container(call, cid, bundle, init, "running")
    state["restored_from"] = image
    _save(root, state)
    _write_pid_file(call.flag("--pid-file"), init["pid"])
    return 0


def do_checkpoint(call: Call) -> int:
    root, cid = call.root, call.cid()
    state = _load(root, cid)
    if state["status"] not in ("running", "paused"):
        raise RuncError("container is not running")
    image = call.flag("--image-path")
    if not image:
        raise RuncError("--image-path is required")
    work = call.flag("--work-path") or image
    os.makedirs(image, exist_ok=True)
    os.makedirs(work, exist_ok=True)
    pids = _live_pids(state)
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
        _signal_all(pids, signal.SIGKILL)
        _wait_dead(state)
        shutil.rmtree(_dir(root, cid))
    return 0


def do_kill(call: Call) -> int:
    root, cid = call.root, call.cid()
    sig = _signal_number(call.args[1] if len(call.args) > 1 else "SIGTERM")
    state = _load(root, cid)
    if call.has("--all", "-a"):
        _signal_all(_live_pids(state), sig)
        return 0
    if state["status"] == "stopped":
        raise RuncError("container not running")
    _signal_all([int(state["init"]["pid"])], sig)
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
    state = _load(root, cid)
    status = state["status"]
    if status in ("running", "paused") and not call.has("--force", "-f"):
        raise RuncError(f"cannot delete container {cid} that is not stopped: {status}")
    # A created container is destroyed without --force, as runc does.
    pids = _live_pids(state)
    _signal_all(pids, signal.SIGKILL)
    _signal_all(pids, signal.SIGCONT)
    _wait_dead(state)
    shutil.rmtree(_dir(root, cid))
    return 0


def do_pause(call: Call) -> int:
    root, cid = call.root, call.cid()
    state = _load(root, cid)
    if state["status"] != "running":
        raise RuncError("container not running")
    _signal_all(_live_pids(state), signal.SIGSTOP)
    state["status"] = "paused"
    _save(root, state)
    return 0


def do_resume(call: Call) -> int:
    root, cid = call.root, call.cid()
    state = _load(root, cid)
    if state["status"] != "paused":
        raise RuncError("container not paused")
    _signal_all(_live_pids(state), signal.SIGCONT)
    state["status"] = "running"
    _save(root, state)
    return 0


def do_update(call: Call) -> int:
    root, cid = call.root, call.cid()
    state = _load(root, cid)
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
    _save(root, state)
    return 0


def do_ps(call: Call) -> int:
    state = _load(call.root, call.cid())
    pids = _live_pids(state)
    if call.flag("--format", "-f") == "json":
        print(json.dumps(pids))
    else:
        print("UID PID PPID C STIME TTY TIME CMD")
        for pid in pids:
            print(f"0 {pid} 0 0 00:00 ? 00:00:00 fake")
    return 0


def do_events(call: Call) -> int:
    cid = call.cid()
    state = _load(call.root, cid)
    if not call.has("--stats"):
        raise RuncError("the fake runc reports events only with --stats")
    pids = _live_pids(state)
    rss = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open(f"/proc/{pid}/statm") as f:
                rss += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    data = {
        "cpu": {"usage": {"total": 1000, "kernel": 400, "user": 600, "percpu": [1000]}},
        "memory": {"usage": {"usage": rss, "limit": 1 << 30}, "raw": {"rss": rss}},
        "pids": {"current": len(pids), "limit": 0},
    }
    print(json.dumps({"type": "stats", "id": cid, "data": data}))
    return 0


def do_exec(call: Call) -> int:
    root, cid = call.root, call.cid()
    if call.has("--console-socket", "--tty", "-t"):
        raise RuncError("the fake runc has no terminals (--console-socket)")
    state = _load(root, cid)
    if state["status"] == "paused":
        raise RuncError("cannot exec in a paused container")
    if state["status"] != "running":
        raise RuncError("cannot exec in a stopped container")
    path = call.flag("--process", "-p")
    if not path:
        raise RuncError("the fake runc executes only --process specs")
    with open(path) as f:
        args, env, cwd = _process_spec(json.load(f))
    proc = _spawn(args, env, cwd)
    state["execs"].append(proc)
    _save(root, state)
    _write_pid_file(call.flag("--pid-file"), proc["pid"])
    if call.has("--detach", "-d"):
        return 0
    _, status = os.waitpid(proc["pid"], 0)
    return os.waitstatus_to_exitcode(status) % 256


def do_state(call: Call) -> int:
    cid = call.cid()
    state = _load(call.root, cid)
    alive = state["status"] != "stopped"
    print(
        json.dumps(
            {
                "ociVersion": SPEC_VERSION,
                "id": cid,
                "pid": int(state["init"]["pid"]) if alive else 0,
                "status": state["status"],
                "bundle": state["bundle"],
                "rootfs": os.path.join(state["bundle"], "rootfs"),
                "created": state["created"],
                "owner": "",
            },
            indent=2,
        )
    )
    return 0


def do_features(call: Call) -> int:
    features = {
        "ociVersionMin": "1.0.0",
        "ociVersionMax": SPEC_VERSION,
        "hooks": ["prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop"],
        "mountOptions": ["bind", "rbind", "ro", "rw", "nosuid", "nodev", "noexec"],
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "user", "uts"],
            "cgroup": {"v1": True, "v2": True, "systemd": True, "systemdUser": True},
            "seccomp": {"enabled": False},
            "apparmor": {"enabled": False},
            "selinux": {"enabled": False},
        },
        "annotations": {
            "org.opencontainers.runc.version": VERSION,
            "org.opencontainers.runc.checkpoint.enabled": "true",
        },
    }
    print(json.dumps(features, indent=2))
    return 0


def do_version(call: Call) -> int:
    print(f"runc version {VERSION}\ncommit: fake\nspec: {SPEC_VERSION}\ngo: go1.22.12\nlibseccomp: 2.5.5")
    return 0


VERBS = {
    "create": do_create,
    "start": do_start,
    "restore": do_restore,
    "checkpoint": do_checkpoint,
    "kill": do_kill,
    "delete": do_delete,
    "pause": do_pause,
    "resume": do_resume,
    "update": do_update,
    "ps": do_ps,
    "events": do_events,
    "exec": do_exec,
    "state": do_state,
    "features": do_features,
    "version": do_version,
}

# Verbs that read or write container state take the root's lock (delays are served first,
# so a slow verb can be cancelled without holding up the others).
_STATEFUL = {"create", "start", "restore", "checkpoint", "kill", "delete", "pause", "resume", "update", "exec"}


# -- control files and the log ------------------------------------------------------------------


def _record(home: str, argv: list[str]) -> None:
    line = json.dumps({"argv": argv, "cwd": os.getcwd(), "pid": os.getpid()}) + "\n"
    fd = os.open(os.path.join(home, "calls.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _control(home: str, kind: str, verb: str) -> str | None:
    try:
        with open(os.path.join(home, kind, verb)) as f:
            return f.read()
    except FileNotFoundError:
        return None


def _log_error(log_path: str, msg: str) -> None:
    entry = json.dumps({"level": "error", "msg": msg, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    if log_path:
        with open(log_path, "a") as f:
            f.write(entry + "\n")
    else:
        print(msg, file=sys.stderr)


def main(argv: list[str]) -> int:
    home = os.path.dirname(os.path.abspath(__file__))
    _record(home, argv)
    log_path = ""
    try:
        call = Call(argv)
        log_path = call.globals.get("--log", [""])[-1]
        delay = _control(home, "delay", call.verb)
        if delay is not None:
            time.sleep(float(delay or 0))
        failure = _control(home, "fail", call.verb)
        if failure is not None:
            spec = json.loads(failure)
            _log_error(log_path, str(spec.get("msg", f"{call.verb} failed on request")))
            return int(spec.get("code", 1))
        if call.verb not in _STATEFUL:
            return VERBS[call.verb](call)
        os.makedirs(call.root, mode=0o711, exist_ok=True)
        with open(os.path.join(call.root, ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return VERBS[call.verb](call)
    except RuncError as exc:
        _log_error(log_path, str(exc))
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
