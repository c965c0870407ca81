"""What containerd's configuration says of this shim's runtimes, for `hotrestart doctor`.

The configuration is containerd's own account of it (`containerd config dump`: the main file
with its imports and defaults merged), so the doctor sees what containerd uses. Runtimes are
found wherever the CRI plugin keeps them (config version 2 and 3 differ in the plugin's name).
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import tomllib
from collections.abc import Iterator, Mapping
from typing import Any

from hotrestart.errors import InvalidArgumentError
from hotrestart.options import RuntimeOptions, from_table

SHIM_TYPE = "io.containerd.hotrestart.v2"
MAX_DEPTH = 8


@dataclasses.dataclass(frozen=True, slots=True)
class Runtime:
    """One runtime of this shim's type: its options and what containerd is told beside them."""

    options: RuntimeOptions
    pod_annotations: tuple[str, ...] = ()
    runtime_path: str = ""


def dump(config_path: str = "", containerd: str = "containerd") -> dict[str, Any]:
    """containerd's effective configuration; raises OSError or ValueError when unreadable."""
    argv = [containerd, *(["--config", config_path] if config_path else []), "config", "dump"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if result.returncode != 0:
        raise ValueError(f"{' '.join(argv)}: exit {result.returncode}: {result.stderr.strip()[-300:]}")
    return tomllib.loads(result.stdout)


def hotrestart_runtimes(config: Mapping[str, Any]) -> dict[str, RuntimeOptions]:
    """The runtimes of type `SHIM_TYPE` by name, with their decoded options."""
    return {name: runtime.options for name, runtime in registered(config).items()}


def registered(config: Mapping[str, Any]) -> dict[str, Runtime]:
    """The runtimes of type `SHIM_TYPE` by name: options, pod annotations passed, shim path."""
    found: dict[str, Runtime] = {}
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
        annotations = runtime.get("pod_annotations") or []
        runtime_path = runtime.get("runtime_path") or ""
        found[name] = Runtime(
            options=from_table(table),
            pod_annotations=tuple(str(a) for a in annotations) if isinstance(annotations, list) else (),
            runtime_path=runtime_path if isinstance(runtime_path, str) else "",
        )
    return found


def runtime_options(config: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
    """The raw `options` table of the runtime called `name` (of any type), if configured."""
    for found, runtime in _runtimes(config, 0):
        if found == name:
            options = runtime.get("options")
            return options if isinstance(options, Mapping) else {}
    return None


def path_match(pattern: str, name: str) -> bool:
    """Whether `name` matches `pattern` as Go's path.Match has it, which is how containerd
    matches `pod_annotations` and `imports`: `*` and `?` never match "/"; a malformed
    pattern matches nothing."""
    regex = _glob_regex(pattern)
    return regex is not None and re.fullmatch(regex, name, re.DOTALL) is not None


def _glob_regex(pattern: str) -> str | None:
    out: list[str] = []
    i, n = 0, len(pattern)

    def escaped(at: int) -> tuple[str, int] | None:
        # One character of a class, as Go's getEsc reads it: "-" and "]" must be escaped.
        if at >= n or pattern[at] in "-]":
            return None
        if pattern[at] == "\\":
            at += 1
            if at >= n:
                return None
        return pattern[at], at + 1

    while i < n:
        c = pattern[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "\\":
            i += 1
            if i >= n:
                return None
            out.append(re.escape(pattern[i]))
        elif c == "[":
            i += 1
            negated = i < n and pattern[i] == "^"
            i += negated
            ranges: list[str] = []
            while not (ranges and i < n and pattern[i] == "]"):
                lo = escaped(i)
                if lo is None:
                    return None
                i = lo[1]
                if i < n and pattern[i] == "-":
                    hi = escaped(i + 1)
                    if hi is None:
                        return None
                    ranges.append(f"{re.escape(lo[0])}-{re.escape(hi[0])}")
                    i = hi[1]
                else:
                    ranges.append(re.escape(lo[0]))
            out.append(f"[{'^' if negated else ''}{''.join(ranges)}]")
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


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
