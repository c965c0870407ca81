"""What containerd asks of a container, decoded: its creation, an exec, and its state."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from hotrestart.container.process import StdioPaths
from hotrestart.container.state import State
from hotrestart.errors import InvalidArgumentError
from hotrestart.runtime import mounts


@dataclasses.dataclass(frozen=True, slots=True)
class CreateConfig:
    id: str
    bundle: str
    rootfs: tuple[mounts.Mount, ...]
    stdio: StdioPaths
    checkpoint: str = ""
    no_pivot: bool = False
    no_new_keyring: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class ExecConfig:
    exec_id: str
    stdio: StdioPaths
    spec: dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class ProcessState:
    id: str
    exec_id: str
    bundle: str
    pid: int
    state: State
    stdio: StdioPaths
    exit_status: int
    exited_at_ns: int


def load_spec(bundle: str) -> dict[str, Any]:
    """The bundle's OCI spec ({} when there is none)."""
    try:
        with open(os.path.join(bundle, "config.json")) as f:
            spec: dict[str, Any] = json.load(f)
            return spec
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise InvalidArgumentError(f"bundle {bundle}: invalid config.json: {exc}") from exc
