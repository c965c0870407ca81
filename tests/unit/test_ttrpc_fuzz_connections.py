"""A ttrpc fuzzer against the real server over a real Unix socket: more connections than the cap.

A burst of connections over limits.MAX_CONNECTIONS, all at once: the extra ones are closed at
once, every accepted one still works, and afterwards the server still serves, has logged no
failure, and holds no more descriptors than before.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Iterator

import pytest
from ttrpc_fuzz_server import Failures, fds, quiet_server_log, start_server, still_serving
from ttrpc_fuzzer import FD_BOUND, SEED, Fuzzer


@pytest.fixture
def server_log() -> Iterator[Failures]:
    with quiet_server_log() as handler:
        yield handler


async def test_connections_over_the_cap(tmp_path: os.PathLike[str], server_log: Failures) -> None:
    loop = asyncio.get_running_loop()
    loop_errors: list[str] = []
    loop.set_exception_handler(lambda _loop, context: loop_errors.append(str(context.get("message"))))

    path = os.path.join(str(tmp_path), "fuzz.sock")
    server = await start_server(path)
    fuzzer = Fuzzer(path, server, random.Random(SEED))
    fds_before = fds()
    stop_watching = asyncio.Event()
    watcher = asyncio.ensure_future(fuzzer.watch_fds(stop_watching))
    await fuzzer.over_the_cap()
    stop_watching.set()
    await watcher

    await still_serving(path, server)
    fds_after = fds()
    await server.close()

    s = fuzzer.stats
    print(
        f"\nttrpc fuzz (seed {SEED}): {s.connections} connections, {s.refused} refused over the cap; "
        f"descriptors {fds_before} before, {s.max_fds} at most, {fds_after} after"
    )
    assert s.refused > 0
    assert not server_log.errors, server_log.errors[:3]
    assert not loop_errors, loop_errors[:3]
    assert s.max_fds <= fds_before + FD_BOUND
    assert fds_after <= fds_before + 2
