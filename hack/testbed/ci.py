"""Whether the run is CI's: there a missing test bed or tool fails a test instead of skipping it."""

from __future__ import annotations

import os


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
