"""A ttrpc fuzzer against the real server over a real Unix socket: what peers send on their connections.

Peers of every kind run side by side in rounds until at least HOTRESTART_FUZZ_FRAMES frames
(100,000 by default) have gone in: well-behaved pipelines, byte-flipped frames, truncated and
abruptly closed streams, oversize frames, huge metadata, byte-at-a-time and stalled writers,
and peers that never read their replies. Throughout, a fresh client must get an answer within
two seconds; at the end the server must still serve, have logged no failure, and hold no more
descriptors or memory than the bounds in ttrpc_fuzzer.py. The run is reproducible:
HOTRESTART_FUZZ_SEED picks the random choices.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Iterator

import pytest
from ttrpc_fuzz_server import Failures, fds, quiet_server_log, rss, settled_rss, start_server, still_serving, until
from ttrpc_fuzzer import FD_BOUND, FRAMES, RSS_GROWTH_BOUND, RSS_PEAK_BOUND, SEED, Fuzzer


@pytest.fixture
def server_log() -> Iterator[Failures]:
    with quiet_server_log() as handler:
        yield handler


async def test_fuzz_server(tmp_path: os.PathLike[str], server_log: Failures) -> None:
    loop = asyncio.get_running_loop()
    loop_errors: list[str] = []
    loop.set_exception_handler(lambda _loop, context: loop_errors.append(str(context.get("message"))))

    path = os.path.join(str(tmp_path), "fuzz.sock")
    server = await start_server(path)
    fuzzer = Fuzzer(path, server, random.Random(SEED))
    fds_before = fds()
    rss_start = rss()
    started = time.monotonic()

    stop, stop_watching = asyncio.Event(), asyncio.Event()
    prober = asyncio.ensure_future(fuzzer.probe(stop))
    watcher = asyncio.ensure_future(fuzzer.watch_fds(stop_watching))
    await fuzzer.run_round()
    await until(lambda: server.connection_count <= 1 or prober.done())  # the prober's, at most
    rss_before = settled_rss()
    rounds = 1
    while fuzzer.stats.frames < FRAMES:
        await fuzzer.run_round()
        rounds += 1
        assert not prober.done(), "the prober failed"
    stop.set()
    await prober  # raises what it met
    elapsed = time.monotonic() - started
    stop_watching.set()
    await watcher

    # Afterwards: still serving, every connection gone, nothing left in flight.
    await still_serving(path, server)
    rss_growth = settled_rss() - rss_before
    fds_after = fds()
    await server.close()

    s = fuzzer.stats
    mib = 1 << 20
    print(
        f"\nttrpc fuzz (seed {SEED}): {s.frames} frames over {s.connections} connections in {rounds} rounds, "
        f"{elapsed:.1f} s; descriptors {fds_before} before, {s.max_fds} at most, {fds_after} after; "
        f"RSS {rss_start / mib:.0f} MiB at start, peak +{(s.max_rss - rss_start) / mib:.1f} MiB, "
        f"{rss_growth / mib:+.1f} MiB from after the first round to the end; {s.probes} probes, slowest "
        f"{s.max_probe * 1000:.0f} ms; {server_log.warnings} warnings logged; "
        f"replies {dict(sorted(s.replies.items()))}"
    )
    assert s.frames >= FRAMES
    assert not server_log.errors, server_log.errors[:3]
    assert not loop_errors, loop_errors[:3]
    assert s.max_fds <= fds_before + FD_BOUND
    assert fds_after <= fds_before + 2
    assert rss_growth < RSS_GROWTH_BOUND
    assert s.max_rss - rss_start < RSS_PEAK_BOUND
    for code in ("OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"):
        assert s.replies.get(code, 0) > 0
    assert "UNKNOWN" not in s.replies
