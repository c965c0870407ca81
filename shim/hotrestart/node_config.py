"""What containerd's configuration says of this shim's runtimes, for `hotrestart doctor`.

The configuration is containerd's own account of it (`containerd config dump`: the main file
with its imports and defaults merged), so the doctor sees what containerd uses. Runtimes are
found wherever the CRI plugin keeps them (config version 2 and 3 differ in the plugin's name).
"""

from __future__ import annotations

import subprocess
import tomllib
from collections.abc import Iterator, Mapping
from typing import Any

from hotrestart.errors import InvalidArgumentError
from hotrestart.options import RuntimeOptions, from_table

SHIM_TYPE = "io.containerd.hotrestart.v2"
MAX_DEPTH = 8


def dump(config_path: str = "", containerd: str = "containerd") -> dict[str, Any]:
    """containerd's effective configuration; raises OSError or ValueError when unreadable."""
    argv = [containerd, *(["--config", config_path] if config_path else []), "config", "dump"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if result.returncode != 0:
        raise ValueError(f"{' '.join(argv)}: exit {result.returncode}: {result.stderr.strip()[-300:]}")
    return tomllib.loads(result.stdout)


def hotrestart_runtimes(config: Mapping[str, Any]) -> dict[str, RuntimeOptions]:
    """The runtimes of type `SHIM_TYPE` by name, with their decoded options."""
    found: dict[str, RuntimeOptions] = {}
    for name, runtime in _runtimes(config, 0):
        if runtime.get("runtime_type") != SHIM_TYPE:
            continue
        table = dict(runtime.get("options") or {})
        path = table.get("ConfigPath")
        if isinstance(path, str) and path:
            try:
                with open(path, "rb") as f:
                    table = {**tomllib.load(f), **table}
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise InvalidArgumentError(f"runtime {name}: options file {path}: {exc}") from exc
        found[name] = from_table(table)
    return found


def _runtimes(table: Mapping[str, Any], depth: int) -> Iterator[tuple[str, Mapping[str, Any]]]:
    if depth > MAX_DEPTH:
        return
    for key, value in table.items():
        if not isinstance(value, Mapping):
            continue
        if key == "runtimes":
            for name, runtime in value.items():
                if isinstance(runtime, Mapping):
                    yield str(name), runtime
        else:
            yield from _runtimes(value, depth + 1)
