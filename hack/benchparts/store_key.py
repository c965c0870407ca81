"""Hot restart with a store key (sealed checkpoints) against without."""

from __future__ import annotations

import base64
import os
import statistics
import sys
from pathlib import Path

from testbed import ContainerdInstance

from .hot_restart import hot_cycle
from .memhog import build_memhog
from .progress import progress


def bench_store_key(inst: ContainerdInstance, cri, mib: int, rounds: int) -> None:
    """Durable and restore times with a store key (sealed checkpoints) against without, in
    alternating rounds on two containerds of the same build."""
    key = inst.dir / "store-key"
    key.write_text(f"bench:{base64.b64encode(os.urandom(32)).decode()}\n")
    key.chmod(0o600)
    memhog = build_memhog(inst.dir)
    plain: list[dict[str, float]] = []
    sealed: list[dict[str, float]] = []
    with ContainerdInstance(shim_bin_dir=Path(sys.executable).parent, env={"HOTRESTART_STORE_KEY": str(key)}) as keyed:
        kcri = keyed.cri()
        for i in range(rounds):
            progress(f"store key: round {i + 1} of {rounds}")
            # Each side goes first in every other round: the second of a pair runs on a
            # machine the first has just churned.
            pair = [
                (plain, lambda i=i: hot_cycle(inst, cri, memhog, mib, f"plain-{i}")),
                (sealed, lambda i=i: hot_cycle(keyed, kcri, memhog, mib, f"sealed-{i}")),
            ]
            for results, run in pair if i % 2 == 0 else reversed(pair):
                results.append(run())
        kcri.close()
    print(f"\n### Store key ({mib} MiB, median of {rounds} alternating rounds)\n")
    print("| | without a key | with a key | ratio |\n|---|---|---|---|")
    for label, at in (
        ("checkpoint durable after the stop (s)", "durable"),
        ("StartContainer to running again (s)", "restore"),
    ):
        a = statistics.median(r[at] for r in plain)
        b = statistics.median(r[at] for r in sealed)
        print(f"| {label} | {a:.2f} | {b:.2f} | {b / a:.2f}x |")
