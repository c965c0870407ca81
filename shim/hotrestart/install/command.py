"""`hotrestart install` and `hotrestart uninstall`: the command lines and what --wait adds.

Without --wait each does its work once and exits (non-zero when it failed, or when the
installed node is not ready). With --wait, as the DaemonSet runs them, the process stays up
afterwards: install prunes the store every interval and retries the doctor and the label
until they pass; uninstall retries what it could not do yet (the label, versions in use).
"""

from __future__ import annotations

import argparse

from hotrestart import bundle
from hotrestart.install import installer, readiness, settings, upkeep, waiting
from hotrestart.install.errors import InstallError


def say(line: str) -> None:
    print(line, flush=True)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("install", help="install the runtime on this node (from the bundle, into the host root)")
    p.add_argument(
        "--wait",
        action="store_true",
        help="afterwards stay up until SIGTERM (for a DaemonSet): prune the store, retry the doctor and the label",
    )
    p.add_argument("--bundle", default="", help="the bundle to install (default: the one this command runs from)")
    p.set_defaults(fn=cmd_install)
    p = sub.add_parser("uninstall", help="take the runtime off this node, putting containerd's config back")
    p.add_argument(
        "--wait",
        action="store_true",
        help="afterwards stay up until SIGTERM (for a DaemonSet): retry what is left (the label, versions in use)",
    )
    p.set_defaults(fn=cmd_uninstall)


def _bundle_dir(given: str) -> str:
    where = given or bundle.root()
    if not where:
        raise InstallError("not running from a bundle: give the bundle to install with --bundle DIR")
    return where


def cmd_install(args: argparse.Namespace) -> int:
    try:
        config = settings.from_env()
        name = installer.install(config, _bundle_dir(args.bundle), say)
    except (InstallError, OSError) as exc:
        say(f"hotrestart: install failed: {exc}")
        return 1
    ready = readiness.make_ready(config, say)
    say(f"hotrestart: installed {name}")
    if not args.wait:
        return 0 if ready else 1

    def tick() -> None:
        nonlocal ready
        upkeep.prune(config, say)
        if not ready:
            ready = readiness.make_ready(config, say)

    waiting.until_stopped(config.prune_interval, tick, say)
    return 0


class _Uninstall:
    """Uninstall as far as it can go now; `step` again carries on from there."""

    def __init__(self, config: settings.Settings) -> None:
        self.config = config
        self.unlabelled = False
        self.done = False
        self.left: list[str] = []

    def step(self) -> bool:
        """Whether everything is done; InstallError or OSError when a step failed."""
        if not self.unlabelled:
            readiness.label(self.config, False, say)  # first: no new pod comes to this node
            self.unlabelled = True
        if not self.done:
            self.left = installer.uninstall(self.config, say)
            self.done = True
            if self.left:
                say(f"versions: {', '.join(self.left)} will be removed once no process uses them")
            say("hotrestart: uninstalled")
        elif self.left:
            self.left = installer.remove_versions(self.config, say)
        return not self.left


def cmd_uninstall(args: argparse.Namespace) -> int:
    try:
        work = _Uninstall(settings.from_env())
    except InstallError as exc:
        say(f"hotrestart: uninstall failed: {exc}")
        return 1
    finished = False

    def attempt() -> None:
        nonlocal finished
        if finished:
            return
        try:
            finished = work.step()
        except (InstallError, OSError) as exc:
            say(f"hotrestart: uninstall failed: {exc}" + (" (trying again)" if args.wait else ""))

    attempt()
    if not args.wait:
        return 0 if work.done else 1
    waiting.until_stopped(work.config.prune_interval, attempt, say)
    return 0
