"""A pod's labels, asked of containerd by a short-lived child process.

gRPC, once used, stays in a process: about 12 MB of memory and seven threads for the rest
of the pod's life, against a shim that is otherwise a few MB. A pod's labels are needed once
at most (at create when its namespace has workload checkpoints, else at its first dump), so
the call runs in a helper interpreter (`main` below) and only its answer comes back:
the labels as JSON on stdout, or the reason on stderr.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import TYPE_CHECKING

from hotrestart.errors import ContainerdAPIError
from hotrestart.workload import containerd_api

if TYPE_CHECKING:  # the helper itself imports as little as it can
    from hotrestart.runtime.command import CommandRunner

MAX_ANSWER = 1 << 20  # the helper's own caps keep it far below this
CALL_TIMEOUT = 3.0  # the helper's call to containerd
# The whole lookup, the helper's start included (well under a second on a node). A node
# much slower than that (a machine under emulation) sets HOTRESTART_LABEL_LOOKUP_TIMEOUT in
# containerd's environment: past it, the pod's identity falls back to its name.
TIMEOUT_ENV = "HOTRESTART_LABEL_LOOKUP_TIMEOUT"
DEFAULT_TIMEOUT = 8.0


# The helper imports this very copy of the package, wherever it is installed: -I (no user
# site, no environment variables steering a root helper) also drops PYTHONPATH.
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_RUN = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from hotrestart.workload.lookup import main; sys.exit(main(sys.argv[2:]))"
)


def argv(address: str, namespace: str, container_id: str, timeout: float) -> list[str]:
    return [sys.executable, "-I", "-c", _RUN, _PACKAGE_ROOT, address, namespace, container_id, str(timeout)]


def lookup_timeout(environ: dict[str, str] | None = None) -> float:
    """The whole lookup's time limit: HOTRESTART_LABEL_LOOKUP_TIMEOUT seconds, or the default."""
    value = (os.environ if environ is None else environ).get(TIMEOUT_ENV, "")
    try:
        seconds = float(value) if value else DEFAULT_TIMEOUT
    except ValueError:
        return DEFAULT_TIMEOUT
    return min(max(seconds, CALL_TIMEOUT + 0.5), 600.0) if seconds == seconds else DEFAULT_TIMEOUT


async def pod_labels(
    runner: CommandRunner, address: str, namespace: str, sandbox_id: str, *, timeout: float = DEFAULT_TIMEOUT
) -> dict[str, str]:
    """The labels of the pod whose sandbox is `sandbox_id`, within `timeout` seconds in all;
    ContainerdAPIError on any failure."""
    try:
        result = await runner.run(argv(address, namespace, sandbox_id, CALL_TIMEOUT), timeout=timeout)
    except TimeoutError:
        raise ContainerdAPIError(f"the label lookup did not answer within {timeout:g}s ({TIMEOUT_ENV})") from None
    except OSError as exc:
        raise ContainerdAPIError(f"the label lookup could not run: {exc}") from exc
    if result.returncode != 0:
        why = result.stderr.decode(errors="replace").strip().splitlines()
        raise ContainerdAPIError(why[-1][:500] if why else f"the label lookup failed (exit {result.returncode})")
    if len(result.stdout) > MAX_ANSWER:
        raise ContainerdAPIError("the label lookup answered too much")
    try:
        labels = json.loads(result.stdout)
    except ValueError as exc:
        raise ContainerdAPIError(f"the label lookup answered garbage: {exc}") from exc
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise ContainerdAPIError("the label lookup answered something other than labels")
    return labels


def main(args: list[str]) -> int:
    if len(args) != 4:
        print("usage: python -m hotrestart.workload.lookup ADDRESS NAMESPACE CONTAINER_ID TIMEOUT", file=sys.stderr)
        return 2
    address, namespace, container_id, timeout = args
    try:
        labels = asyncio.run(containerd_api.container_labels(address, namespace, container_id, timeout=float(timeout)))
    except (ContainerdAPIError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 1
    json.dump(labels, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
