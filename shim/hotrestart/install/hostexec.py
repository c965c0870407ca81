"""Running the host's own programs (systemctl, containerd, the installed doctor) on the host.

The child chroots into the host root before it execs, so the program, its libraries and
what it reads are the host's, and a bare name is looked up on the host's standard PATH, not
the installer image's. `run` is the only way the installer starts anything on the host: tests
replace it, and nothing else needs to.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from collections.abc import Mapping, Sequence

HOST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_OUTPUT = 64 << 10


@dataclasses.dataclass(frozen=True, slots=True)
class Result:
    code: int  # 127: could not be started (not found on the host, say)
    output: str  # stdout and stderr together, the last MAX_OUTPUT characters

    @property
    def ok(self) -> bool:
        return self.code == 0


def run(host_root: str, argv: Sequence[str], *, timeout: float = 120, env: Mapping[str, str] | None = None) -> Result:
    """Run `argv` chrooted into `host_root` with the host's PATH (and `env` added)."""

    def enter_host() -> None:
        os.chroot(host_root)
        os.chdir("/")

    try:
        # A bare argv[0] is searched for along PATH after enter_host, inside the host root.
        done = subprocess.run(
            list(argv),
            env={"PATH": HOST_PATH, "LC_ALL": "C.UTF-8", **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=enter_host,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return Result(127, f"{argv[0]}: {exc}")
    text = done.stdout.decode("utf-8", "replace")
    return Result(done.returncode, text[-MAX_OUTPUT:])
