"""What the installer did to the host, kept so that uninstall can undo exactly that.

`<install dir>/state/containerd-config.orig` holds containerd's main file as it was before
the first install (absent when there was none), and `install.json` what we wrote since: the
sha256 of the main file and drop-in as we left them, the key we copied. The original is
recorded once: a later install must not take our own edit for the administrator's file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

from hotrestart.install.errors import InstallError
from hotrestart.install.hostfs import HostFS

FORMAT = 1
MAX_STATE = 64 << 10


def sha256(data: bytes | None) -> str:
    return hashlib.sha256(data).hexdigest() if data is not None else ""


@dataclasses.dataclass(frozen=True, slots=True)
class State:
    containerd_config: str
    config_existed: bool
    config_mode: int  # of the original, restored with it
    method: str  # how the runtime is registered: "dropin" (containerd 2.x) or "block" (1.7)
    config_written: str = ""  # sha256 of the main file as we left it
    dropin: str = ""  # its host path; "" for a block
    dropin_written: str = ""
    store_key: str = ""  # host path of the key we copied; "" when none
    store_key_written: str = ""
    s3_config: str = ""  # host path of the S3 config we copied; "" when none
    s3_config_written: str = ""
    runtime_name: str = ""
    made: tuple[str, ...] = ()  # host folders the install created for its files, removed when empty
    restart_pending: bool = False  # containerd's configuration changed and it has not restarted since


def state_dir(install_dir: str) -> str:
    return os.path.join(install_dir, "state")


def _paths(install_dir: str) -> tuple[str, str]:
    folder = state_dir(install_dir)
    return os.path.join(folder, "install.json"), os.path.join(folder, "containerd-config.orig")


def load(fs: HostFS, install_dir: str) -> State | None:
    path, _ = _paths(install_dir)
    data = fs.read(path, MAX_STATE)
    if data is None:
        return None
    try:
        raw: Any = json.loads(data)
        if not isinstance(raw, dict) or raw.pop("format", None) != FORMAT:
            raise ValueError("unknown format")
        return State(**{**raw, "made": tuple(raw.get("made", ()))})
    except (ValueError, TypeError) as exc:
        raise InstallError(f"{fs.real(path)} is damaged ({exc}): remove it only once the host is checked") from None


def save(fs: HostFS, install_dir: str, state: State) -> bool:
    path, _ = _paths(install_dir)
    text = json.dumps({"format": FORMAT, **dataclasses.asdict(state)}, indent=2, sort_keys=True) + "\n"
    return fs.write(path, text.encode(), 0o600)


def save_original(fs: HostFS, install_dir: str, data: bytes | None) -> None:
    """Keep the main file's bytes as they are before we change anything (nothing when absent)."""
    _, orig = _paths(install_dir)
    if data is not None:
        fs.write(orig, data, 0o600)


def original(fs: HostFS, install_dir: str, limit: int) -> bytes | None:
    _, orig = _paths(install_dir)
    return fs.read(orig, limit)
