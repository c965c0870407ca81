"""Hot restart through the object store (the test bed's Ceph RADOS Gateway on loopback)
against the directory store, side by side: three containerds of the same build and key
(the directory store; S3 with the node-local chunk cache; S3 without it, as another node
restoring would be), taking rounds in turn.

Per round and store: a memhog service is stopped (StopContainer until the exit is
reported), its checkpoint waited for until it is published (durable), and the service
created again, lazily (the default) and in full: StartContainer + the process answering.
The gateway and its OSD run on this machine's cores too: the figures are an upper bound
for a gateway on its own hosts.
"""

from __future__ import annotations

import base64
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from testbed import ContainerdInstance, objectstore

from .hot_restart import checkpoint_of
from .memhog import build_memhog, memhog_pod, wait_for_line
from .pods import remove_pod
from .progress import progress

Published = Callable[[str], dict | None]  # pod name -> its published manifest, or None


def _s3_published(url: str, key: Path, local: Path) -> Published:
    from hotrestart.store.keyfile import load
    from hotrestart.store.objectstore import ObjectStore

    store = ObjectStore(url, keys=load(str(key)), local=str(local))

    def find(name: str) -> dict | None:
        for e in store.entries():
            if e.state == "checkpoints" and e.manifest is not None and e.manifest.identity.pod == name:
                return {"files": [{"stored_bytes": f.stored_bytes, "raw_bytes": f.raw_bytes} for f in e.manifest.files]}
        return None

    return find


def _dir_published(inst: ContainerdInstance) -> Published:
    import json

    def find(name: str) -> dict | None:
        found = checkpoint_of(inst.store / "v1" / "checkpoints", name)
        return json.loads(found.read_text()) if found is not None else None

    return find


def _cycle(inst: ContainerdInstance, cri, published: Published, memhog: Path, mib: int, name: str) -> dict[str, float]:
    r: dict[str, float] = {}
    pod, cid = memhog_pod(cri, inst, "hotrestart", name, memhog, [str(mib)])
    cri.start_container(cid)
    wait_for_line(cri, cid, lambda x: x.startswith("ready"))
    before = wait_for_line(cri, cid, lambda x: x.split()[0] == "3")
    t0 = time.monotonic()
    cri.stop_container(cid, timeout=60)
    r["stop"] = time.monotonic() - t0
    while (manifest := published(name)) is None:
        if time.monotonic() - t0 > 300:
            raise SystemExit(f"no checkpoint of {name} was published")
        time.sleep(0.02)
    r["durable"] = time.monotonic() - t0
    r["stored"] = sum(f["stored_bytes"] for f in manifest["files"])
    remove_pod(cri, pod)
    for mode in ("lazy", "full"):
        pod, cid = memhog_pod(
            cri, inst, "hotrestart", name, memhog, [str(mib)], annotations={"hotrestart.io/restore": mode}
        )
        t0 = time.monotonic()
        cri.start_container(cid)
        r[f"{mode}_started"] = time.monotonic() - t0
        resumed = wait_for_line(cri, cid, lambda x: x.startswith("resumed") or x[:1].isdigit())
        r[f"{mode}_answers"] = time.monotonic() - t0
        row = wait_for_line(cri, cid, lambda x: x[:1].isdigit())
        if row.split()[1] != before.split()[1]:
            raise SystemExit(f"{mode} restore lost the memory: {before} then {row} ({resumed})")
        if mode == "lazy":
            # Stopped again for the full restore: a new checkpoint of the same memory.
            cri.stop_container(cid, timeout=60)
            deadline = time.monotonic() + 300
            while published(name) is None and time.monotonic() < deadline:
                time.sleep(0.05)
        else:
            cri.stop_container(cid, timeout=0)
        remove_pod(cri, pod)
    deadline = time.monotonic() + 60
    while published(name) is not None and time.monotonic() < deadline:
        time.sleep(0.05)  # a stopped restored container consumes its checkpoint
    return r


def bench_object_store(inst: ContainerdInstance, cri, mib: int, rounds: int) -> None:
    env = objectstore.running_env()
    started = env is None
    if env is None:
        progress("object store: starting the test bed's Ceph RADOS Gateway")
        env = objectstore.up()
    try:
        _bench(inst, env, mib, rounds)
    finally:
        if started:
            objectstore.down()


def _remove_prefix(url: str) -> None:
    """Delete what a run left in the bucket: a test bed's OSD is small, and a full one
    blocks every PUT."""
    from hotrestart.store.s3 import Bucket, Location

    bucket = Bucket(Location.parse(url))
    bucket.delete([meta.key for meta in bucket.listing("")])


def _bench(inst: ContainerdInstance, env: dict[str, str], mib: int, rounds: int) -> None:
    key = inst.dir / "object-store-key"
    key.write_text(f"bench:{base64.b64encode(os.urandom(32)).decode()}\n")
    key.chmod(0o600)
    url = f"{env['HOTRESTART_STORE']}/bench-{os.urandom(4).hex()}"
    memhog = build_memhog(inst.dir)
    s3_env = dict(env, HOTRESTART_STORE_KEY=str(key), HOTRESTART_S3_STAGING=str(inst.dir / "s3-staging"))
    cached = dict(s3_env, HOTRESTART_S3_CACHE=str(inst.dir / "s3-cache"))
    uncached = dict(s3_env, HOTRESTART_S3_CACHE_BYTES="0")
    for name, value in env.items():
        os.environ[name] = value
    columns = ("directory store", "S3, restored on the same node", "S3, restored on another node")
    results: dict[str, list[dict[str, float]]] = {c: [] for c in columns}
    try:
        _rounds(inst, url, key, memhog, mib, rounds, cached, uncached, results, columns)
    finally:
        progress("object store: removing the run's objects")
        _remove_prefix(url)
    _report(mib, rounds, columns, results)


def _rounds(
    inst: ContainerdInstance,
    url: str,
    key: Path,
    memhog: Path,
    mib: int,
    rounds: int,
    cached: dict[str, str],
    uncached: dict[str, str],
    results: dict[str, list[dict[str, float]]],
    columns: tuple[str, ...],
) -> None:
    shims = Path(sys.executable).parent
    with (
        ContainerdInstance(shim_bin_dir=shims, env={"HOTRESTART_STORE_KEY": str(key)}) as on_dir,
        ContainerdInstance(shim_bin_dir=shims, env=cached, store=url) as on_s3,
        ContainerdInstance(shim_bin_dir=shims, env=uncached, store=url) as elsewhere,
    ):
        cris = [on_dir.cri(), on_s3.cri(), elsewhere.cri()]
        published = [
            _dir_published(on_dir),
            _s3_published(url, key, inst.dir / "s3-bench"),
            _s3_published(url, key, inst.dir / "s3-bench"),
        ]
        for i in range(rounds):
            progress(f"object store: round {i + 1} of {rounds}")
            order = list(zip(columns, (on_dir, on_s3, elsewhere), cris, published, ("dir", "s3", "s3x"), strict=True))
            for column, node, cri, found, tag in order[i % 3 :] + order[: i % 3]:
                results[column].append(_cycle(node, cri, found, memhog, mib, f"{tag}-{i}"))
                progress(f"object store, {column}: {results[column][-1]}")
        for cri in cris:
            cri.close()


def _report(mib: int, rounds: int, columns: tuple[str, ...], results: dict[str, list[dict[str, float]]]) -> None:
    print(f"\n### Object store ({mib} MiB, median of {rounds} rounds in turn, sealed with a store key)\n")
    print(
        "The node that restores from S3 without the node-local chunk cache (`HOTRESTART_S3_CACHE_BYTES=0`)"
        " stands for another node: every chunk comes from the gateway.\n"
    )
    print(f"| | {' | '.join(columns)} | ratios |\n|---|---|---|---|---|")
    for label, at in (
        ("stop: signal to exit reported (s)", "stop"),
        ("checkpoint durable after the stop (s)", "durable"),
        ("restore, lazy: StartContainer returns (s)", "lazy_started"),
        ("restore, lazy: the process answers (s)", "lazy_answers"),
        ("restore, full: the process answers (s)", "full_answers"),
    ):
        base, here, other = (statistics.median(r[at] for r in results[c]) for c in columns)
        print(f"| {label} | {base:.2f} | {here:.2f} | {other:.2f} | {here / base:.2f}x, {other / base:.2f}x |")
