"""The change list stored beside the files' tar: what a tar cannot say (deletions)."""

from __future__ import annotations

import dataclasses
import json

from hotrestart.checkpoint.rootfs.bounds import MAX_ENTRIES
from hotrestart.errors import FilesError


@dataclasses.dataclass
class Changes:
    """What the tar cannot say: paths deleted (whiteouts) and directories replaced whole."""

    whiteouts: list[str] = dataclasses.field(default_factory=list)
    opaque: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)  # devices, sockets, vanished

    def to_json(self) -> str:
        return json.dumps({"whiteouts": self.whiteouts, "opaque": self.opaque})

    @classmethod
    def from_json(cls, text: str | bytes) -> Changes:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise FilesError(f"the list of deleted files is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise FilesError("the list of deleted files is malformed")
        lists: dict[str, list[str]] = {}
        for key in ("whiteouts", "opaque"):
            value = data.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise FilesError(f"the list of deleted files is malformed ({key})")
            if len(value) > MAX_ENTRIES:
                raise FilesError(f"the list of deleted files is too long ({key})")
            lists[key] = value
        return cls(lists["whiteouts"], lists["opaque"])


def load_changes(path: str) -> Changes:
    with open(path, "rb") as f:
        return Changes.from_json(f.read(64 << 20))
