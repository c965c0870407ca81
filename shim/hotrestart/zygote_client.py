"""The `start` verb's side of the zygote: one round trip, almost no imports.

`start` sits on every pod's start path, so this module uses only `os` and the C-level
`_socket` module (the `socket` module alone pulls in `enum` and `selectors`). The request
is NUL-separated `key=value` fields; the zygote answers `ok <address>`, `err <message>` or
`stale` (it runs older code and is going away).
"""

from __future__ import annotations

import _socket
import os

SOCKET_ENV = "HOTRESTART_ZYGOTE_SOCKET"
ENABLE_ENV = "HOTRESTART_ZYGOTE"  # "0" turns the zygote off
DEFAULT_SOCKET = "/run/hotrestart/zygote.sock"
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def enabled() -> bool:
    return os.environ.get(ENABLE_ENV, "1") != "0"


def socket_path() -> str:
    return os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


def code_stamp(package: str = PACKAGE_DIR) -> str:
    """Identifies the installed code, so an upgraded package never runs in a stale zygote.

    Every module of the package counts, in every subpackage: the number of modules and the
    newest change time (ctime: writing, replacing or renaming a file sets it, and unlike
    mtime no installer carries it over from an older archive). Runs on every `start`; the
    walk costs about 0.5 ms for the package's hundred modules."""
    count = newest = 0
    pending = [package]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.name.endswith(".py"):
                    count += 1
                    try:
                        newest = max(newest, entry.stat().st_ctime_ns)
                    except OSError:  # a dangling link must not fail `start`; the count still tells
                        pass
                elif entry.name != "__pycache__" and entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
    return f"{count}:{newest}"


def encode(fields: dict[str, str], env: dict[str, str]) -> bytes:
    parts = [f"{k}={v}" for k, v in fields.items()] + [f"env:{k}={v}" for k, v in env.items()]
    body = "\0".join(parts).encode()
    return len(body).to_bytes(4, "big") + body


def decode(body: bytes) -> tuple[dict[str, str], dict[str, str]]:
    fields: dict[str, str] = {}
    env: dict[str, str] = {}
    for part in body.decode().split("\0"):
        key, _, value = part.partition("=")
        if key.startswith("env:"):
            env[key[4:]] = value
        elif key:
            fields[key] = value
    return fields, env


class Declined(Exception):
    """The zygote answered but would not start this shim (its message says why).

    Outside the ShimError hierarchy on purpose: it never reaches the wire (the verb falls
    back to a fresh interpreter), and importing `errors` would load asyncio into the
    `start` verb, whose speed is the point of this module."""


def _connect(wait: float) -> _socket.socket | None:
    """Connect to the zygote, retrying for up to `wait` seconds while one is starting."""
    import time

    deadline = time.monotonic() + wait
    while True:
        conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        conn.settimeout(10)
        try:
            conn.connect(socket_path())
            return conn
        except OSError:
            conn.close()
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)


def request_start(fields: dict[str, str], wait: float = 0.0) -> str | None:
    """The pod's shim address from the zygote, or None when no zygote answers."""
    conn = _connect(wait)
    if conn is None:
        return None
    try:
        fields = dict(fields, cwd=os.getcwd(), stamp=code_stamp())
        try:
            conn.sendall(encode(fields, dict(os.environ)))
            reply = b""
            while chunk := conn.recv(4096):
                reply += chunk
        except OSError:
            return None
    finally:
        conn.close()
    if reply.startswith(b"ok "):
        return reply[3:].decode()
    if reply.startswith(b"err "):
        raise Declined(reply[4:].decode(errors="replace"))
    return None
