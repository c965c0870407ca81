"""Reading the CRI container log format (``<RFC3339Nano> <stream> <F|P> <message>`` lines)."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class LogLine:
    timestamp: str
    stream: str  # "stdout" or "stderr"
    tag: str  # "F" (full line) or "P" (partial)
    message: str


_LOG_RE = re.compile(r"^(\S+) (stdout|stderr) ([FP])(?: (.*))?$")


def parse_cri_log(text: str) -> list[LogLine]:
    """Parse a CRI container log (``<RFC3339Nano> <stream> <F|P> <message>`` lines)."""
    out = []
    for line in text.splitlines():
        m = _LOG_RE.match(line)
        if not m:
            raise ValueError(f"not a CRI log line: {line!r}")
        out.append(LogLine(m[1], m[2], m[3], m[4] or ""))
    return out
