"""Stand-ins for what surrounds the shim in unit tests: runc, containerd's event service, its FIFOs.

`FakeRunc` installs `runc_program.py` as an executable and steers it (failures, delays) and
reads back what it was asked to do. Processes it starts are real children of the test
process, which is made a child subreaper for the purpose (see conftest.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from google.protobuf.message import Message

PROGRAM = Path(__file__).with_name("runc_program.py")


class FakeRunc:
    """The fake runc installed in `home`, keeping container state under `root`."""

    def __init__(self, home: Path, root: Path) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.home = home
        self.root = root
        self.binary = home / "runc"
        # This interpreter, with -S: no site packages to import, so each call starts in a few ms.
        # The copy finds its modules (fakerunc/) beside the program, not beside itself.
        path = f"import sys\nsys.path.insert(0, {str(PROGRAM.parent)!r})\n"
        self.binary.write_text(f"#!{sys.executable} -S\n{path}{PROGRAM.read_text()}")
        self.binary.chmod(0o755)

    # -- steering ---------------------------------------------------------------------------

    def fail(self, verb: str, msg: str, code: int = 1) -> None:
        """Make `verb` log `msg` as an error and exit with `code` until `clear` is called."""
        self._control("fail", verb, json.dumps({"msg": msg, "code": code}))

    def delay(self, verb: str, seconds: float) -> None:
        self._control("delay", verb, str(seconds))

    def clear(self, verb: str) -> None:
        for kind in ("fail", "delay"):
            with contextlib.suppress(FileNotFoundError):
                (self.home / kind / verb).unlink()

    def _control(self, kind: str, verb: str, text: str) -> None:
        (self.home / kind).mkdir(exist_ok=True)
        (self.home / kind / verb).write_text(text)

    # -- reading back -----------------------------------------------------------------------

    def calls(self) -> list[list[str]]:
        """Every argv the fake was run with (without the program name), oldest first."""
        path = self.home / "calls.jsonl"
        if not path.exists():
            return []
        return [json.loads(line)["argv"] for line in path.read_text().splitlines()]

    def verbs(self) -> list[str]:
        """The verb of each call, global flags skipped ("version" for --version)."""
        return [_verb_of(argv) for argv in self.calls()]

    def state(self, cid: str, root: Path | None = None) -> dict[str, Any]:
        """The fake's own record of a container (its status as stored, not as derived)."""
        data: dict[str, Any] = json.loads(((root or self.root) / cid / "state.json").read_text())
        return data

    def exists(self, cid: str, root: Path | None = None) -> bool:
        return ((root or self.root) / cid / "state.json").exists()

    def all_pids(self) -> list[int]:
        """Every process the fake started that is still alive, in any root under its own."""
        pids: list[int] = []
        for state_file in self.root.rglob("state.json"):
            with contextlib.suppress(OSError, ValueError):
                state = json.loads(state_file.read_text())
                for proc in [state["init"], *state["execs"]]:
                    if process_alive(int(proc["pid"])):
                        pids.append(int(proc["pid"]))
        return pids

    def kill_all(self) -> None:
        """SIGKILL whatever a test left running, and reap it (we are its subreaper)."""
        pids = self.all_pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                os.kill(pid, signal.SIGCONT)
        for pid in pids:
            reap(pid)


def _verb_of(argv: list[str]) -> str:
    i = 0
    while i < len(argv):
        if argv[i] in ("--version", "-v"):
            return "version"
        if argv[i] in ("--root", "--log", "--log-format", "--criu"):
            i += 2
        elif argv[i].startswith("-"):
            i += 1
        else:
            return argv[i]
    return ""


def process_alive(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def reap(pid: int, timeout: float = 5.0) -> None:
    """Collect `pid` if it is our child (a test's leftovers; the shim's Reaper may beat us to it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            if not process_alive(pid):
                return
        else:
            if done:
                return
        time.sleep(0.01)


def children_of(pid: int) -> list[int]:
    """Live (non-zombie) children of `pid`, from /proc."""
    found: list[int] = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError):
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
                found.append(int(name))
    return found


class EventRecorder:
    """containerd's event service as the shim's `EventSink` sees it: records every publish.

    `on_publish` hooks run inside `publish`, so a test can look at the world at the very
    moment an event leaves (e.g. what reached a FIFO before the exit was reported)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Message]] = []
        self.hooks: list[Any] = []
        self._changed = asyncio.Event()

    def publish(self, topic: str, event: Message) -> None:
        for hook in self.hooks:
            hook(topic, event)
        self.events.append((topic, event))
        self._changed.set()

    def topics(self, cid: str | None = None) -> list[str]:
        return [t for t, e in self.events if cid is None or getattr(e, "container_id", None) == cid]

    def of(self, topic: str) -> list[Any]:
        return [e for t, e in self.events if t == topic]

    async def wait_for(self, topic: str, count: int = 1, timeout: float = 10.0) -> Any:
        """The `count`-th event with `topic`, once published."""
        async with asyncio.timeout(timeout):
            while len(self.of(topic)) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.of(topic)[count - 1]


SLOW_READ_BYTES = 16384
SLOW_READ_INTERVAL = 0.01


class FifoReader:
    """containerd's end of an output FIFO: made before the shim opens it, read from the event loop.

    Opened non-blocking for reading with no writer yet; Linux reports no hang-up on a FIFO
    that never had a writer, so the reader waits quietly until the shim opens its end."""

    def __init__(self, path: Path, *, slow: bool = False) -> None:
        os.mkfifo(path)
        self.path = path
        self.data = bytearray()
        self.eof = asyncio.Event()
        self._fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        if slow:
            # A reader that lags (as containerd can): output stays queued in the FIFO and behind it.
            self._timer = self._loop.call_later(SLOW_READ_INTERVAL, self._read_some)
        else:
            self._loop.add_reader(self._fd, self.read_now)

    def read_now(self, limit: int = 1 << 30) -> bytes:
        """Take in what the FIFO holds now (up to `limit` bytes); returns what has been read in all."""
        while self._fd >= 0 and limit > 0:
            try:
                chunk = os.read(self._fd, min(limit, 65536))
            except BlockingIOError:
                break
            if not chunk:
                self.eof.set()
                self.close()
                break
            self.data += chunk
            limit -= len(chunk)
        return bytes(self.data)

    def _read_some(self) -> None:
        self.read_now(SLOW_READ_BYTES)
        if self._fd >= 0:
            self._timer = self._loop.call_later(SLOW_READ_INTERVAL, self._read_some)

    async def text(self, timeout: float = 10.0) -> str:
        """Everything written, once the shim has closed its end."""
        async with asyncio.timeout(timeout):
            await self.eof.wait()
        return self.data.decode()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1


class FifoWriter:
    """containerd's end of a stdin FIFO. Opened read-write so that opening never blocks and
    the shim's reader sees end of file only when this closes."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def write(self, data: bytes) -> None:
        os.write(self._fd, data)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def make_bundle(
    parent: Path, cid: str, args: list[str], *, annotations: dict[str, str] | None = None, env: list[str] | None = None
) -> Path:
    """A bundle with a minimal config.json: what the fake runc reads, no namespaces, no rootfs."""
    bundle = parent / cid
    bundle.mkdir(parents=True)
    spec: dict[str, Any] = {
        "ociVersion": "1.2.0",
        "process": {
            "args": args,
            "env": env or [f"PATH={os.environ.get('PATH', '/usr/bin:/bin')}"],
            "cwd": str(bundle),
        },
        "root": {"path": "rootfs"},
        "linux": {},
    }
    if annotations:
        spec["annotations"] = annotations
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


async def eventually(check: Callable[[], object], timeout: float = 5.0, what: str = "") -> None:
    """Wait until `check()` is true (for things with no event to wait on: files, FIFO contents)."""
    for _ in range(int(timeout / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what or check}")


def python_args(code: str) -> list[str]:
    """A process running `code` in this interpreter, started fast (no site packages)."""
    return [sys.executable, "-S", "-u", "-c", code]


# A process that says it is ready, and on SIGTERM writes a lot (more than pipe and FIFO buffers
# hold) before dying of that signal: the exit is reportable only after all of it was copied.
TERM_WITH_OUTPUT_BYTES = 300_000
TERM_WITH_OUTPUT = python_args(
    "import os, signal, sys, time\n"
    "def term(sig, frame):\n"
    f"    sys.stdout.write('x' * {TERM_WITH_OUTPUT_BYTES}); sys.stdout.flush()\n"
    "    signal.signal(signal.SIGTERM, signal.SIG_DFL); os.kill(os.getpid(), signal.SIGTERM)\n"
    "signal.signal(signal.SIGTERM, term)\n"
    "print('ready', flush=True)\n"
    "while True: time.sleep(1)\n"
)


def freezing_would_stop_us() -> bool:
    """Whether freezing the cgroup of this process would freeze it for real.

    The fake runc's processes share the test's cgroup, and the shim freezes a container's
    cgroup around a checkpoint: where that cgroup has a freezer we can write (root in a
    cgroup of its own), the test would freeze itself."""
    with open("/proc/self/cgroup") as f:
        lines = f.read().splitlines()
    for line in lines:
        _hid, controllers, path = line.split(":", 2)
        if "freezer" in controllers.split(","):
            state = os.path.join("/sys/fs/cgroup/freezer", path.lstrip("/"), "freezer.state")
        elif controllers == "":
            state = os.path.join("/sys/fs/cgroup", path.lstrip("/"), "cgroup.freeze")
        else:
            continue
        if os.path.exists(state) and os.access(state, os.W_OK) and _fstype(state) in ("cgroup", "cgroup2"):
            return True
    return False


def _fstype(path: str) -> str:
    """The type of the filesystem `path` is on, from the longest matching mount point."""
    best, fstype = "", ""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields, _, rest = line.partition(" - ")
            mount_point = fields.split()[4]
            if (path == mount_point or path.startswith(mount_point.rstrip("/") + "/")) and len(mount_point) > len(best):
                best, fstype = mount_point, rest.split()[0]
    return fstype
