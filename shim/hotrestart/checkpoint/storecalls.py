"""Store calls from the shim's event loop.

A directory store answers from the node's own disk: its calls run inline, and no worker
thread stays in every shim for them. An object store's calls wait on the network (up to
`HOTRESTART_S3_TIMEOUT` when the gateway hangs), so they run on worker threads and never
stall the shim's other requests. Calls made where nothing can wait for them (an exit, a
failed restore) run `later`, in the order they were made (a pending marker is cleared after
it is set, never before), and the shim waits for them before it exits (`drain`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from hotrestart.store.backend import Backend

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


class StoreCalls:
    def __init__(self, store: Backend) -> None:
        self.remote = store.remote
        self._last: asyncio.Future[None] | None = None
        self._running: set[asyncio.Future[None]] = set()

    async def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        if not self.remote:
            return fn(*args, **kwargs)
        return await asyncio.to_thread(fn, *args, **kwargs)

    def later(self, what: str, fn: Callable[P, object], *args: P.args, **kwargs: P.kwargs) -> None:
        """Run `fn` now (a local store) or after the calls made before it (a remote one); an
        OSError is logged with `what`, as the store being out of reach."""
        if not self.remote:
            try:
                fn(*args, **kwargs)
            except OSError as exc:
                log.warning("%s: %s", what, exc)
            return
        previous = self._last

        async def run() -> None:
            if previous is not None:
                await asyncio.wait([previous])
            try:
                await asyncio.to_thread(fn, *args, **kwargs)
            except OSError as exc:
                log.warning("%s: %s", what, exc)

        task = asyncio.ensure_future(run())
        self._last = task
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def drain(self, timeout: float) -> None:
        if self._running:
            await asyncio.wait(list(self._running), timeout=timeout)
