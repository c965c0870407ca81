"""Progress lines on stderr, so that stdout holds only the result tables."""

from __future__ import annotations

import sys
import time


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
