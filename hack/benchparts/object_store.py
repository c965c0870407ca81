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
import re
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
                files = [
                    {"stored_bytes": f.stored_bytes, "raw_bytes": f.raw_bytes, "chunks": f.chunks}
                    for f in e.manifest.files
                ]
                return {"files": files, "timings": dict(e.manifest.timings), "new_bytes": e.manifest.new_bytes}
        return None

    return find


def _dir_published(inst: ContainerdInstance) -> Published:
    import json

    def find(name: str) -> dict | None:
        found = checkpoint_of(inst.store / "v1" / "checkpoints", name)
        return json.loads(found.read_text()) if found is not None else None

    return find


class _ShimLog:
    """A node's log from here on: what its shims said since."""

    def __init__(self, node: ContainerdInstance) -> None:
        self._path = node.log_path
        self._at = self._path.stat().st_size if self._path.exists() else 0
        self._text = ""

    def published(self, identity: str) -> float | None:
        """Seconds from the dump's start to the checkpoint of `identity` published, once the
        shim said it was."""
        with self._path.open("rb") as f:
            f.seek(self._at)
            more = f.read()
        self._at += len(more)
        self._text += more.decode(errors="replace")
        said = re.search(rf" of {re.escape(identity)} published: .* in ([0-9.]+)s", self._text)
        return float(said.group(1)) if said is not None else None


def _cycle(inst: ContainerdInstance, cri, published: Published, memhog: Path, mib: int, name: str) -> dict[str, float]:
    r: dict[str, float] = {}
    pod, cid = memhog_pod(cri, inst, "hotrestart", name, memhog, [str(mib)])
    cri.start_container(cid)
    wait_for_line(cri, cid, lambda x: x.startswith("ready"))
    before = wait_for_line(cri, cid, lambda x: x.split()[0] == "3")
    said = _ShimLog(inst)
    t0 = time.monotonic()
    cri.stop_container(cid, timeout=60)
    r["stop"] = time.monotonic() - t0
    # The shim's own line, read from the node's log: polling the store instead (a listing and
    # every manifest, fifty times a second) would load the gateway the upload runs on.
    while (whole := said.published(f"bench/{name}/svc")) is None:
        if time.monotonic() - t0 > 300:
            raise SystemExit(f"no checkpoint of {name} was published")
        time.sleep(0.02)
    r["durable"] = time.monotonic() - t0
    manifest = published(name)
    if manifest is None:
        raise SystemExit(f"the checkpoint of {name} is not in the store although its shim published it")
    r["stored"] = sum(f["stored_bytes"] for f in manifest["files"])
    r["new"] = manifest.get("new_bytes", 0)
    r["chunks"] = sum(len(f.get("chunks", [])) for f in manifest["files"])
    # Where the time went, as the shim measured it from the dump's start.
    timings = manifest.get("timings", {})
    r["dump"] = timings.get("dump", 0.0)
    r["after_dump"] = timings.get("compress", 0.0)
    r["publish"] = whole - timings.get("durable", whole)
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
                time.sleep(0.2)
        else:
            cri.stop_container(cid, timeout=0)
        remove_pod(cri, pod)
    deadline = time.monotonic() + 60
    while published(name) is not None and time.monotonic() < deadline:
        time.sleep(0.2)  # a stopped restored container consumes its checkpoint
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
        alone = _gateway_alone(url, results[columns[1]], rounds)
    finally:
        progress("object store: removing the run's objects")
        _remove_prefix(url)
    _report(mib, rounds, columns, results, alone)


def _gateway_alone(url: str, runs: list[dict[str, float]], rounds: int) -> dict[str, list[float]]:
    """What the gateway takes to accept a checkpoint's new bytes by themselves: as many
    objects of the same mean size, PUT as many at a time as the shim's writer does, with
    the same client; and the same with a HEAD before each PUT, as the writer looks for a
    chunk before it uploads it. The floor under the S3 column's time after the dump."""
    from concurrent.futures import ThreadPoolExecutor

    from hotrestart.store.objectstore import IO_THREADS
    from hotrestart.store.s3 import Bucket, Location

    new, stored = statistics.median(r["new"] for r in runs), statistics.median(r["stored"] for r in runs)
    size = max(1, int(stored / max(statistics.median(r["chunks"] for r in runs), 1)))  # a chunk's mean
    count = max(1, round(new / size))
    bucket = Bucket(Location.parse(f"{url}/gateway-alone"))
    bodies = [os.urandom(size) for _ in range(min(count, 2 * IO_THREADS))]  # incompressible, as sealed chunks are

    def upload(key: str, body: bytes, look: bool) -> None:
        if not look or bucket.head(key) is None:
            bucket.put(key, body)

    took: dict[str, list[float]] = {"put": [], "head_put": []}
    for i in range(rounds):
        for how in took:
            progress(f"object store: the gateway alone ({how}), {count} objects of {size >> 10} KiB, round {i + 1}")
            at, look = f"{how}/{i}/", how == "head_put"
            t0 = time.monotonic()
            with ThreadPoolExecutor(IO_THREADS) as pool:
                list(
                    pool.map(
                        lambda n, at=at, look=look: upload(f"{at}{n}", bodies[n % len(bodies)], look), range(count)
                    )
                )
            took[how].append(time.monotonic() - t0)
    return took


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


def _report(
    mib: int,
    rounds: int,
    columns: tuple[str, ...],
    results: dict[str, list[dict[str, float]]],
    alone: dict[str, list[float]],
) -> None:
    print(f"\n### Object store ({mib} MiB, median of {rounds} rounds in turn, sealed with a store key)\n")
    print(
        "The node that restores from S3 without the node-local chunk cache (`HOTRESTART_S3_CACHE_BYTES=0`)"
        " stands for another node: every chunk comes from the gateway.\n"
    )
    print(f"| | {' | '.join(columns)} | ratios |\n|---|---|---|---|---|")
    for label, at in (
        ("stop: signal to exit reported (s)", "stop"),
        ("checkpoint durable after the stop (s)", "durable"),
        ("of which the dump (s)", "dump"),
        ("of which storing what was left after the dump (s)", "after_dump"),
        ("of which publishing the manifest (s)", "publish"),
        ("restore, lazy: StartContainer returns (s)", "lazy_started"),
        ("restore, lazy: the process answers (s)", "lazy_answers"),
        ("restore, full: the process answers (s)", "full_answers"),
    ):
        base, here, other = (statistics.median(r[at] for r in results[c]) for c in columns)
        ratios = f"{here / base:.2f}x, {other / base:.2f}x" if base > 0 else "-"
        print(f"| {label} | {base:.2f} | {here:.2f} | {other:.2f} | {ratios} |")
    s3 = results[columns[1]]
    new, chunks = statistics.median(r["new"] for r in s3), statistics.median(r["chunks"] for r in s3)
    print(
        f"\nA checkpoint added {new / 2**20:.0f} MiB of new chunks (of {chunks:.0f} in all). The gateway"
        f" alone took {statistics.median(alone['put']):.2f} s (median of {len(alone['put'])}) to accept that"
        " many bytes in objects of the same mean size, PUT as many at a time as the shim does, and"
        f" {statistics.median(alone['head_put']):.2f} s with a HEAD before each PUT, as the shim's writer"
        " looks for a chunk before it uploads it: the floor under S3's time after the dump on this machine."
    )
