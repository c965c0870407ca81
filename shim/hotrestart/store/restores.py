"""What a restore noted beside the checkpoint it restored: where, when, lazily or not, and when
the process had all of its memory back (`hotrestart inspect`).

The record is the restoring node's word, read back as store input: parsed as JSON within
`MAX_RECORD` bytes, only the known fields kept, each of its type.
"""

from __future__ import annotations

import dataclasses
import json
import math

NAME = "restore.json"
MAX_RECORD = 4096


@dataclasses.dataclass(frozen=True, slots=True)
class Record:
    node: str
    started_at: float  # wall time the restore began
    lazy: bool
    resident_after: float | None = None  # seconds from the start until every page was in (lazy)

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Record | None:
        """The record in `data`, or None when it is not one."""
        if len(data) > MAX_RECORD:
            return None
        try:
            raw = json.loads(data)
        except (ValueError, RecursionError):
            return None
        if not isinstance(raw, dict):
            return None
        node, lazy = raw.get("node"), raw.get("lazy")
        started, resident = _seconds(raw.get("started_at")), _seconds(raw.get("resident_after"))
        if not isinstance(node, str) or not isinstance(lazy, bool) or started is None:
            return None
        if resident is None and raw.get("resident_after") is not None:
            return None
        return cls(node[:253], started, lazy, resident)


def _seconds(value: object) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None
