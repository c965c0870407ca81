"""`containerd-shim-hotrestart-v2`: the verbs containerd runs (start, delete) and the daemon.

containerd calls `<shim> -namespace NS -address A -publish-binary B -id ID [-debug] start`
with the bundle as working directory, reads the socket address from our output, and later
`... -bundle B delete` to clean up after a shim that died. Flags are Go style (one dash)
and come before the action word. This module imports as little as possible until it knows
which verb runs: `start` is on every pod's start path.
"""

from __future__ import annotations

import os
import sys


class Flags:
    """containerd's shim flags. A plain class: importing `dataclasses` costs `start` 17 ms."""

    def __init__(
        self,
        *,
        namespace: str = "",
        address: str = "/run/containerd/containerd.sock",
        publish_binary: str = "",
        id: str = "",
        bundle: str = "",
        debug: bool = False,
    ) -> None:
        self.namespace = namespace
        self.address = address
        self.publish_binary = publish_binary
        self.id = id
        self.bundle = bundle
        self.socket = ""
        self.debug = debug
        self.version = False
        self.info = False
        self.action = ""


_VALUE_FLAGS = {"namespace", "address", "publish-binary", "id", "bundle", "socket"}
_BOOL_FLAGS = {"debug", "v", "version", "info"}


def parse(argv: list[str]) -> Flags:
    flags = Flags()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-") or arg in ("-", "--"):
            if arg == "--":
                i += 1
            break
        name, eq, value = arg.lstrip("-").partition("=")
        if name in _BOOL_FLAGS:
            if name in ("v", "version"):
                flags.version = True
            elif name == "debug":
                flags.debug = value.lower() not in ("false", "0") if eq else True
            else:
                flags.info = True
        elif name in _VALUE_FLAGS:
            if not eq:
                i += 1
                if i >= len(argv):
                    raise SystemExit(f"flag needs an argument: -{name}")
                value = argv[i]
            setattr(flags, name.replace("-", "_"), value)
        else:
            raise SystemExit(f"flag provided but not defined: -{name}")
        i += 1
    rest = argv[i:]
    if rest:
        flags.action = rest[0]
    return flags


def main(argv: list[str] | None = None) -> None:
    # containerd runs as a systemd notify service, and its shims inherit its NOTIFY_SOCKET. It is
    # containerd's: runc given one takes the container for a notify service and binds a proxy
    # socket under its state folder (past the length a socket path may have, for a pod's id
    # under /run/containerd/runc), so every start fails. containerd's runc shim drops it too.
    os.environ.pop("NOTIFY_SOCKET", None)
    flags = parse(sys.argv[1:] if argv is None else argv)
    if flags.version:
        from hotrestart import __version__

        print(f"containerd-shim-hotrestart-v2:\n  Version:  {__version__}\n  Runtime:  runc")
        return
    if flags.info:
        from hotrestart.lifecycle import print_info

        print_info()
        return
    if not flags.namespace:
        raise SystemExit("shim namespace cannot be empty")
    if flags.action == "start":
        _start(flags)
    elif flags.action == "delete":
        from hotrestart.lifecycle import delete

        delete(flags)
    elif flags.action == "":
        from hotrestart.daemon import serve

        serve(flags)
    else:
        raise SystemExit(f"unknown action {flags.action!r}")


def _start(flags: Flags) -> None:
    """Get the pod's shim from the node's zygote, launching the zygote first if needed."""
    from hotrestart import zygote_client

    if zygote_client.enabled():
        fields = {
            "namespace": flags.namespace,
            "id": flags.id,
            "address": flags.address,
            "publish_binary": flags.publish_binary,
            "debug": "1" if flags.debug else "",
        }
        try:
            address = zygote_client.request_start(fields)
            if address is None:
                from hotrestart import zygote

                zygote.launch()
                address = zygote_client.request_start(fields, wait=5.0)
        except zygote_client.Declined as exc:
            raise SystemExit(f"start shim: {exc}") from None
        if address is not None:
            sys.stdout.write(address)
            return
    # No zygote: this shim runs in a fresh interpreter of its own.
    from hotrestart.lifecycle import start

    start(flags)


if __name__ == "__main__":
    main()
