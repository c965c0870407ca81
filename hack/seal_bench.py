#!/usr/bin/env python3
"""What sealing costs next to what a checkpoint already does with each 8 MiB chunk.

Per chunk of memory-like data (pages chosen at random to be random bytes or zeros, so it
compresses to about half), in one thread and in a pool of os.cpu_count() threads:
- write path: zstd -1 compression and sha256 of the frame (today), then AES-256-GCM
  sealing of the frame (with a store key);
- restore path: sha256 of the frame and zstd decompression into a buffer (today), then
  opening the frame (with a store key).
Sealing and opening are measured both returning a new result and into a buffer each
thread reuses: in worker threads, glibc maps every multi-megabyte result afresh, and the
page faults cost more than the cipher.
The ratio of the two is the CPU-bound upper limit of the slowdown; a real checkpoint also
waits for CRIU and the disk, which sealing does not add to.

    .venv/bin/python hack/seal_bench.py [--chunks N] [--seconds S]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import os
import random
import threading
import time
from collections.abc import Callable

import zstandard

from hotrestart.store import compress, seal

CHUNK = compress.CHUNK
PAGE = 4096


def memory_like(seed: int) -> bytes:
    rng = random.Random(seed)
    noise = os.urandom(CHUNK)
    zero = bytes(PAGE)
    return b"".join(noise[at : at + PAGE] if rng.random() < 0.5 else zero for at in range(0, CHUNK, PAGE))


_local = threading.local()


def _zstd() -> tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor]:
    if not hasattr(_local, "c"):
        _local.c = zstandard.ZstdCompressor(level=compress.LEVEL)
        _local.d = zstandard.ZstdDecompressor()
    return _local.c, _local.d


def rate(work: Callable[[int], object], chunks: int, threads: int, seconds: float) -> float:
    """Raw MiB/s through `work(chunk_number)`, best of repeated rounds of `chunks` calls."""
    best = 0.0
    deadline = time.perf_counter() + seconds
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        while True:
            start = time.perf_counter()
            if threads == 1:
                for i in range(chunks):
                    work(i)
            else:
                list(pool.map(work, range(chunks)))
            took = time.perf_counter() - start
            best = max(best, chunks * CHUNK / took / (1 << 20))
            if time.perf_counter() > deadline:
                return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=0, help="chunks per round (default: 4 per thread, at least 16)")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    args = parser.parse_args()
    cpus = os.cpu_count() or 1
    chunks = args.chunks or max(16, 4 * cpus)

    raw = [memory_like(i) for i in range(chunks)]
    cctx, _ = _zstd()
    frames = [cctx.compress(r) for r in raw]
    ratio = sum(map(len, frames)) / sum(map(len, raw))

    ring = seal.KeyRing([("bench", os.urandom(32))])
    counter = iter(range(1 << 62))  # a fresh position for every seal: positions are sealed once
    sealer = ring.sealer("bench")
    sealed = [sealer.seal_chunk(0, i, f) for i, f in enumerate(frames)]
    opener = ring.opener(sealer.seal_info(), "bench")

    def buffer(size: int) -> bytearray:
        # One per thread, reused, as a worker would keep it.
        buf: bytearray | None = getattr(_local, "buf", None)
        if buf is None:
            buf = _local.buf = bytearray(size)
        return buf

    def compress(i: int) -> object:
        frame = _zstd()[0].compress(raw[i])
        return hashlib.sha256(frame).digest()

    def seal_frame(i: int) -> object:
        return sealer.seal_chunk(1, next(counter), frames[i])

    def seal_frame_into(i: int) -> object:
        return sealer.seal_chunk_into(1, next(counter), frames[i], buffer(CHUNK + 4096))

    def decompress(i: int) -> object:
        # As a restore does it: check the frame, decompress into a buffer it already has.
        hashlib.sha256(frames[i]).digest()
        return unpack(i)

    def unpack(i: int) -> object:
        out = buffer(CHUNK + 4096)
        with _zstd()[1].stream_reader(frames[i]) as reader, memoryview(out) as view:
            done = 0
            while done < len(raw[i]):
                with view[done : len(raw[i])] as rest:
                    n = reader.readinto(rest)
                if not n:
                    break
                done += n
        return done

    def open_frame(i: int) -> object:
        return opener.open_chunk(0, i, sealed[i])

    def open_frame_into(i: int) -> object:
        return opener.open_chunk_into(0, i, sealed[i], buffer(CHUNK + 4096))

    print(f"{cpus} CPUs; {chunks} chunks of {CHUNK >> 20} MiB, stored at {ratio:.2f} of raw; raw MiB/s, best round")
    print(f"{'':40}{'1 thread':>12}{f'{cpus} threads':>14}")
    steps = {
        "zstd -1, sha256 of frame": compress,
        "seal frame, new result": seal_frame,
        "seal frame into a reused buffer": seal_frame_into,
        "sha256 of frame, zstd -d into buffer": decompress,
        "zstd -d into buffer alone": unpack,
        "open frame, new result": open_frame,
        "open frame into a reused buffer": open_frame_into,
    }
    results: dict[str, tuple[float, float]] = {}
    for name, work in steps.items():
        results[name] = (rate(work, chunks, 1, args.seconds), rate(work, chunks, cpus, args.seconds))
        one, many = results[name]
        print(f"{name:40}{one:12.0f}{many:14.0f}")

    def combined(a: float, b: float) -> float:  # two steps in sequence over the same data
        return 1 / (1 / a + 1 / b)

    for label, base, extra in [
        ("write", "zstd -1, sha256 of frame", "seal frame into a reused buffer"),
        ("restore", "sha256 of frame, zstd -d into buffer", "open frame into a reused buffer"),
        # A frame that opens is authentic (its key is the checkpoint's, its nonce its
        # position, its length in the signed manifest): its sha256 need not be checked.
        ("restore, sealed, no sha256", "sha256 of frame, zstd -d into buffer", "zstd -d into buffer alone"),
        ("write, new results", "zstd -1, sha256 of frame", "seal frame, new result"),
        ("restore, new results", "sha256 of frame, zstd -d into buffer", "open frame, new result"),
    ]:
        for column, threads in ((0, "1 thread"), (1, f"{cpus} threads")):
            before = results[base][column]
            if label == "restore, sealed, no sha256":
                after = combined(results[extra][column], results["open frame into a reused buffer"][column])
            else:
                after = combined(before, results[extra][column])
            print(f"{label}, {threads}: {before:.0f} -> {after:.0f} MiB/s, CPU time x{before / after:.3f}")


if __name__ == "__main__":
    main()
