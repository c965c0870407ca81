"""`--wait`: the DaemonSet's pod stays up after its work, doing upkeep, until it is stopped.

Stopping (SIGTERM from a rolling update or a deleted DaemonSet, SIGINT) ends the wait and
nothing else: the runtime stays installed, since running pods depend on it. Taking it off is
`hotrestart uninstall`'s job alone.
"""

from __future__ import annotations

import signal
import threading
import traceback
from collections.abc import Callable
from types import FrameType


def until_stopped(
    interval: float, tick: Callable[[], None], say: Callable[[str], None], stop: threading.Event | None = None
) -> None:
    """Call `tick` every `interval` seconds until SIGTERM or SIGINT (or `stop`, for tests).
    A failing tick is reported and the wait goes on."""
    stop = stop or threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        say(f"{signal.Signals(signum).name}: stopping (the runtime stays installed)")
        stop.set()

    before = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not stop.wait(interval):
            try:
                tick()
            except Exception as exc:  # upkeep must never end the wait
                say(f"upkeep failed: {exc!r}")
                traceback.print_exc()
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
