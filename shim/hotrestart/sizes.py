"""Sizes as people write them in settings: `500M`, `20G`, `1.5T`."""

from __future__ import annotations

import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes from `500M`, `20G`, `1.5T` (binary units); ValueError otherwise."""
    match = _SIZE.match(text.lower())
    if not match:
        raise ValueError(f"invalid size {text!r} (use e.g. 500M, 20G)")
    return int(float(match.group(1)) * _UNITS[match.group(2)])
