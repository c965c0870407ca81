"""A TOML writer for nested dicts of scalars and lists: enough for containerd's config."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str | Path):
        return json.dumps(str(v))
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML for {v!r}")


def to_toml(data: Mapping[str, Any], _prefix: tuple[str, ...] = ()) -> str:
    """Serialise nested dicts of scalars and lists (enough for containerd)."""
    lines: list[str] = []
    tables = []
    for k, v in data.items():
        if isinstance(v, Mapping):
            tables.append((k, v))
        else:
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
    out = "\n".join(lines)
    for k, v in tables:
        path = (*_prefix, k)
        header = "[" + ".".join(_toml_key(p) for p in path) + "]"
        body = to_toml(v, path)
        out += ("\n\n" if out else "") + header + ("\n" + body if body else "")
    return out
