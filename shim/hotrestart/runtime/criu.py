"""CRIU's own command line and configuration, built here and nowhere else.

runc runs CRIU for every dump and restore; the shim runs CRIU itself only for its version,
its checks and a lazy restore's page daemon, and passes it options runc has no flag for
through a CRIU config file named by the spec.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator

from hotrestart import bundle as node_bundle
from hotrestart.runtime.command import CommandRunner

CONFIG_ANNOTATION = "org.criu.config"  # runc passes this file to CRIU


def version_argv(binary: str = "") -> list[str]:
    return [binary or node_bundle.tool("criu") or "criu", "--version"]


def check_argv(binary: str = "", feature: str = "") -> list[str]:
    """`criu check`, of the whole kernel or of one feature (mem_dirty_track, uffd-noncoop)."""
    return [binary or node_bundle.tool("criu") or "criu", "check", *(["--feature", feature] if feature else [])]


def lazy_pages_argv(binary: str, images: str, work: str, ps_socket: int, status_fd: int) -> list[str]:
    """CRIU's lazy-pages daemon for one restore: it takes the restored tasks' userfaultfds
    over `<work>/lazy-pages.socket` (a `runc restore --lazy-pages` with the same work folder
    connects there) and fetches the pages they fault on, then all the rest, from the page
    server at the other end of the connected socket `ps_socket`. `status_fd` gets a byte
    once it listens. Its log is `<work>/lazy-pages.log`."""
    return [
        binary or node_bundle.tool("criu") or "criu",
        "lazy-pages",
        "--images-dir",
        images,
        "--work-dir",
        work,
        "--page-server",
        "--ps-socket",
        str(ps_socket),
        "--status-fd",
        str(status_fd),
        "--log-file",
        "lazy-pages.log",
        "-v4",
    ]


async def version(runner: CommandRunner, binary: str = "") -> str:
    """CRIU's version ("" when it cannot be run)."""
    try:
        result = await runner.run(version_argv(binary))
    except OSError:
        return ""
    for line in result.stdout.decode(errors="replace").splitlines():
        if line.startswith("Version:"):
            return line.split(":", 1)[1].strip()
    return ""


@contextlib.contextmanager
def config_for(bundle: str, text: str) -> Iterator[None]:
    """Point runc at a CRIU config file holding `text` for one command: the bundle's
    config.json names it while the command runs, and is put back afterwards.

    Both writes replace the file whole (a crash leaves the old or the new spec, never a
    torn one)."""
    spec_path = os.path.join(bundle, "config.json")
    conf = os.path.join(bundle, "criu-restore.conf")
    with open(spec_path, "rb") as f:
        original = f.read()
    spec = json.loads(original)
    spec.setdefault("annotations", {})[CONFIG_ANNOTATION] = conf
    _replace(conf, text.encode())
    _replace(spec_path, json.dumps(spec).encode())
    try:
        yield
    finally:
        _replace(spec_path, original)
        with contextlib.suppress(OSError):
            os.unlink(conf)


def _replace(path: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
