"""The fake runc's command line: global and per-verb flags, parsed and refused as runc's urfave/cli does."""

from __future__ import annotations

from .errors import RuncError

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
