"""Per-pod hot-restart policy, read from the live spec's annotations.

Choosing the RuntimeClass is the opt-in; these pod annotations (passed to the shim because
the runtime's `pod_annotations` lists `hotrestart.io/*`) tune it:

- `hotrestart.io/checkpoint`: `off` disables hot restart for the pod.
- `hotrestart.io/checkpoint-timeout`: budget for a stop-time checkpoint (`10s`, `1m`);
  past it the original signal is delivered. Default 10 s, well inside the default 30 s
  grace period.
- `hotrestart.io/tcp`: `close` (default) closes established TCP connections on restore;
  `keep` restores them when the pod's address is unchanged.
- `hotrestart.io/carry-volumes`: comma-separated emptyDir volume names whose contents
  travel with the checkpoint.
- `hotrestart.io/checkpoint-interval`: take a leave-running checkpoint on this schedule
  (`10m`), so a crash, an OOM kill or the loss of the node loses at most one interval.
- `hotrestart.io/gpu-lock-timeout`: how long cuda-checkpoint may wait for submitted GPU work
  when it locks a process (default 10 s); past it the checkpoint fails and the process runs on.
- `hotrestart.io/identity`: the key under which the checkpoint is stored (default
  namespace/pod/container), for pods whose names change between incarnations.
- `hotrestart.io/skip-containers`: comma-separated container names that always start fresh
  and are never checkpointed (the CRI does not mark init containers: list those that must
  run from the start, a migration say).
- `hotrestart.io/snapshot: template`: warm scale-out for the replicas of a pod template (see
  `template`): once a replica is warm, one leave-running checkpoint of it is kept as the
  template's, and every new replica restores from it without consuming it. Warm means:
  `hotrestart.io/snapshot-after` (a duration after start), or `hotrestart.io/snapshot-marker`
  (a path in the container that the application creates), or an API checkpoint.
  `hotrestart.io/snapshot-signal` (`SIGUSR2`, say) is sent to a replica restored from it;
  `hotrestart.io/snapshot-ttl` (default 24h) is how long a template serves.
- `hotrestart.io/restore`: `lazy` (default) lets a restored process run before all of its
  memory is back, its pages arriving on demand and in the background (where the node has
  userfaultfd, and the container no GPU state); `full` restores all memory first.
- `hotrestart.io/dump`: `incremental` (default) has each dump after the first write only the
  pages written to since the one before, where the kernel tracks soft-dirty pages (the
  stored checkpoint is whole all the same); `full` has every dump read all memory, for
  programs that clear their own soft-dirty bits (a garbage collector using them, say).
"""

from __future__ import annotations

import dataclasses
import re
import signal
from collections.abc import Mapping
from typing import Any

from hotrestart.errors import InvalidArgumentError
from hotrestart.store.manifest import Identity

PREFIX = "hotrestart.io/"
CONTAINER_TYPE = "io.kubernetes.cri.container-type"
SANDBOX_NAMESPACE = "io.kubernetes.cri.sandbox-namespace"
SANDBOX_NAME = "io.kubernetes.cri.sandbox-name"
CONTAINER_NAME = "io.kubernetes.cri.container-name"
IMAGE_NAME = "io.kubernetes.cri.image-name"
DEFAULT_TIMEOUT = 10.0
MIN_INTERVAL = 1.0
DEFAULT_SNAPSHOT_TTL = 24 * 3600.0
MAX_MARKER = 1024

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str) -> float:
    match = _DURATION.match(text)
    if not match:
        raise InvalidArgumentError(f"invalid duration {text!r} (use e.g. 500ms, 10s, 2m)")
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclasses.dataclass(frozen=True)
class Policy:
    enabled: bool
    identity: Identity
    timeout: float = DEFAULT_TIMEOUT
    tcp: str = "close"
    carry_volumes: tuple[str, ...] = ()
    interval: float = 0.0  # seconds between periodic checkpoints; 0 = none
    gpu_lock_timeout: float = 10.0
    snapshot: Snapshot | None = None
    lazy: bool = True  # restore memory on demand where the node can (see lazy.py)
    incremental: bool = True  # dump only what changed since the last dump where the node can (tracking.py)


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """`hotrestart.io/snapshot: template` and its settings."""

    after: float = 0.0  # seconds after start; 0: not on a timer
    marker: str = ""  # absolute path in the container; "": no marker
    signal: int = 0  # sent to a replica restored from the template; 0: none
    ttl: float = DEFAULT_SNAPSHOT_TTL


def snapshot_for(annotations: Mapping[str, str]) -> Snapshot | None:
    kind = annotations.get(PREFIX + "snapshot", "").strip().lower()
    if kind in ("", "off", "none"):
        return None
    if kind != "template":
        raise InvalidArgumentError(f"hotrestart.io/snapshot must be template or off, not {kind!r}")
    after = parse_duration(annotations.get(PREFIX + "snapshot-after", "0"))
    marker = annotations.get(PREFIX + "snapshot-marker", "").strip()
    if marker:
        parts = marker.split("/")
        if not marker.startswith("/") or len(marker) > MAX_MARKER or any(p in (".", "..") for p in parts[1:]):
            raise InvalidArgumentError(
                f"hotrestart.io/snapshot-marker must be an absolute path without . or .. (at most {MAX_MARKER})"
            )
    sig = 0
    name = annotations.get(PREFIX + "snapshot-signal", "").strip().upper()
    if name:
        try:
            sig = int(signal.Signals[name if name.startswith("SIG") else "SIG" + name])
        except KeyError:
            raise InvalidArgumentError(f"hotrestart.io/snapshot-signal: unknown signal {name!r}") from None
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            raise InvalidArgumentError("hotrestart.io/snapshot-signal cannot be SIGKILL or SIGSTOP")
    ttl = parse_duration(annotations.get(PREFIX + "snapshot-ttl", "24h"))
    return Snapshot(after=after, marker=marker, signal=sig, ttl=ttl)


def policy_for(spec: Mapping[str, Any]) -> Policy:
    annotations: Mapping[str, str] = spec.get("annotations") or {}
    identity = Identity(
        namespace=annotations.get(SANDBOX_NAMESPACE, ""),
        pod=annotations.get(SANDBOX_NAME, ""),
        container=annotations.get(CONTAINER_NAME, ""),
        key=annotations.get(PREFIX + "identity", ""),
    )
    if annotations.get(CONTAINER_TYPE) != "container":  # a sandbox, or not made by Kubernetes
        return Policy(False, identity)
    if annotations.get(PREFIX + "checkpoint", "").lower() in ("off", "false", "disabled", "0"):
        return Policy(False, identity)
    skipped = {c.strip() for c in annotations.get(PREFIX + "skip-containers", "").split(",")}
    if identity.container and identity.container in skipped:
        return Policy(False, identity)
    if not identity.key and not (identity.namespace and identity.pod and identity.container):
        return Policy(False, identity)  # nothing to find its checkpoints by after a restart
    timeout = DEFAULT_TIMEOUT
    if PREFIX + "checkpoint-timeout" in annotations:
        timeout = parse_duration(annotations[PREFIX + "checkpoint-timeout"])
    tcp = annotations.get(PREFIX + "tcp", "close").lower()
    if tcp not in ("close", "keep"):
        raise InvalidArgumentError(f"hotrestart.io/tcp must be close or keep, not {tcp!r}")
    volumes = tuple(v.strip() for v in annotations.get(PREFIX + "carry-volumes", "").split(",") if v.strip())
    interval = 0.0
    if annotations.get(PREFIX + "checkpoint-interval", "").strip() not in ("", "0", "off"):
        interval = parse_duration(annotations[PREFIX + "checkpoint-interval"])
        if interval < MIN_INTERVAL:
            raise InvalidArgumentError(f"hotrestart.io/checkpoint-interval must be at least {MIN_INTERVAL:.0f}s")
    gpu_lock = parse_duration(annotations.get(PREFIX + "gpu-lock-timeout", "10s"))
    restore = annotations.get(PREFIX + "restore", "lazy").strip().lower()
    if restore not in ("lazy", "full"):
        raise InvalidArgumentError(f"hotrestart.io/restore must be lazy or full, not {restore!r}")
    dump = annotations.get(PREFIX + "dump", "incremental").strip().lower()
    if dump not in ("incremental", "full"):
        raise InvalidArgumentError(f"hotrestart.io/dump must be incremental or full, not {dump!r}")
    return Policy(
        True,
        identity,
        timeout=timeout,
        tcp=tcp,
        carry_volumes=volumes,
        interval=interval,
        gpu_lock_timeout=gpu_lock,
        snapshot=snapshot_for(annotations),
        lazy=restore == "lazy",
        incremental=dump == "incremental",
    )
