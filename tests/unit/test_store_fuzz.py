"""The checkpoint store against generated hostile stores.

A small valid store is built once; every case copies it, applies a few random mutations
(manifests with swapped types, huge numbers, NaN and Infinity, missing and extra fields, odd
paths; links to a sentinel folder outside the store, hard links to a file outside, FIFOs,
sockets, devices, truncated, swapped, oversized and bomb chunks, odd names, deep trees,
bad pending markers and owner files) and runs what reads or changes the store: listing,
`hotrestart ls/inspect/verify/rm/prune`, retention, a publish, and the restore path's
store-side steps (pending wait, latest, claim, every file decompressed into a work folder
under a cap). Every case must end with no exception but the documented ones, no hang (a
per-case timer), nothing outside the store written, chmodded or removed (the sentinel and
the hard link's target are compared), and no file decompressed that does not verify
(checked independently of the code under test).

HOTRESTART_FUZZ_SEED and HOTRESTART_FUZZ_CASES override the seed and the number of cases.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import multiprocessing
import os
import random
import shutil
import signal
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

import pytest
import zstandard
from storefuzz import IDENTITIES, Case

from hotrestart import cli
from hotrestart.store import archive
from hotrestart.store.entry import Entry
from hotrestart.store.manifest import FileEntry, Identity, Manifest, ManifestError, chunk_root
from hotrestart.store.safefs import UnsafeEntryError
from hotrestart.store.store import Store

SEED = int(os.environ.get("HOTRESTART_FUZZ_SEED", "20261130"))
CASES = int(os.environ.get("HOTRESTART_FUZZ_CASES", "10000"))
CASE_SECONDS = 5.0
DOCUMENTED = (ManifestError, archive.IntegrityError, UnsafeEntryError)


class Hang(Exception):
    pass


class Escape(AssertionError):
    pass


def _alarm(_signum: int, _frame: FrameType | None) -> None:
    raise Hang()


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# -- the base store and the world outside it ---------------------------------------------------


def build_base(root: Path, scratch: Path) -> dict[str, bytes]:
    """A store with two published checkpoints, a quarantined, a claimed and a staging one,
    and pending markers; returns the raw payload of every stored file by its path."""
    store = Store(str(root))
    rng = random.Random(7)
    payloads: dict[str, bytes] = {}
    for n, ident in enumerate(IDENTITIES[:2] + [Identity("tenant-a", "old", "app")] * 2):
        cid, staging = store.new_staging()
        os.makedirs(os.path.join(staging, "images"))
        files = []
        for rel, size in (("images/pages-1.img.zst", 9000), ("rootfs-diff.tar.zst", 700)):
            raw = bytes(rng.getrandbits(8) for _ in range(size // 3)) + b"\0" * (size - size // 3)
            src = scratch / f"raw-{n}-{rel.replace('/', '-')}"
            src.write_bytes(raw)
            files.append(archive.compress_file(str(src), os.path.join(staging, rel), rel, chunk=4096, direct=False))
            payloads[rel] = raw  # the same content whichever checkpoint: sizes are reused
        manifest = Manifest(
            cid, ident, time.time() - 60 * (4 - n), "n1", "stop", "img", "d", {"criu": "4.2"}, {}, files, {}
        )
        published = store.publish(staging, manifest)
        assert published is not None
        if n == 2:
            claimed = store.claim(published)
            assert claimed is not None
            store.quarantine(claimed, "CRIU refused")
        if n == 3:
            assert store.claim(published) is not None
    cid, staging = store.new_staging()
    (Path(staging) / "partial").write_bytes(b"x" * 100)
    store.mark_pending(IDENTITIES[0], "stale")
    for marker in (root / "v1" / "pending").iterdir():
        marker.write_text(f"othernode 1 {time.time() - 7200}\n")
    return payloads


def build_sentinel(out: Path, base: Path) -> None:
    """Outside the store, shaped like it so that a followed link would find things to use."""
    entry = next((base / "v1" / "checkpoints").glob("*/*"))
    shutil.copytree(entry, out / "entry")
    (out / "precious").write_bytes(b"outside the store")
    (out / "hardlinked").write_bytes(b"a hard link's target")
    (out / "v1").mkdir()
    for p in [out, *out.rglob("*")]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)


def snapshot(out: Path) -> dict[str, tuple[bytes, int, int, int]]:
    found = {}
    for p in [out, *out.rglob("*")]:
        st = os.lstat(p)
        content = p.read_bytes() if stat.S_ISREG(st.st_mode) else b""
        found[str(p.relative_to(out))] = (content, st.st_mode, st.st_mtime_ns, st.st_uid)
    return found


# -- what runs against each case ---------------------------------------------------------------


def independently_verified(store_root: Path, entry: Entry, fe: FileEntry, output: bytes) -> bool:
    """Whether `output` is what the manifest and the stored bytes honestly give."""
    path = Path(entry.path) / fe.path
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode) or not fe.chunks or st.st_size != fe.stored_bytes:
        return False
    if chunk_root(fe.chunks) != fe.sha256:
        return False
    data = path.read_bytes()
    at, decoded = 0, b""
    for c in fe.chunks:
        frame = data[at : at + c.stored]
        if hashlib.sha256(frame).hexdigest() != c.sha256:
            return False
        try:
            part = zstandard.ZstdDecompressor().decompress(frame, max_output_size=c.raw + 1)
        except zstandard.ZstdError:
            return False
        if len(part) != c.raw:
            return False
        decoded += part
        at += c.stored
    return decoded == output and str(Path(entry.path).resolve()).startswith(str(store_root.resolve()))


def listing(store: Store, rng: random.Random, outcomes: collections.Counter[str]) -> None:
    """`hotrestart ls`, `inspect` and `verify`, and what they use."""
    listed = list(store.entries())
    for e in listed:
        assert store.size(e) >= 0
    store.problems()
    cli.cmd_ls(argparse.Namespace(store=store.root, all=True))
    if listed:
        cid = rng.choice(listed).id
        cli.cmd_inspect(argparse.Namespace(store=store.root, id=cid, files=True))
        cli.cmd_verify(argparse.Namespace(store=store.root, ids=[cid]))


def restore_path(store: Store, work: Path, rng: random.Random, outcomes: collections.Counter[str]) -> None:
    """What a create and a start do with the store: wait, latest, claim, decompress, settle.
    Every identity finds only its own checkpoints; one of them is restored."""
    found: list[tuple[int, Entry]] = []
    for n, ident in enumerate(IDENTITIES):
        store.is_pending(ident)
        latest = store.latest(ident)
        if latest is not None:
            assert latest.manifest is not None and latest.manifest.identity.same(ident)
            assert ident.namespace == latest.manifest.identity.namespace
            found.append((n, latest))
    if not found:
        return
    n, latest = rng.choice(found)
    assert latest.manifest is not None
    problems = store.verify(latest)
    verified = {fe.path: not any(p.startswith(fe.path + ":") for p in problems) for fe in latest.manifest.files}
    outcomes["verify ok" if not problems else "verify refused"] += 1
    claimed = store.claim(latest)
    if claimed is None:
        outcomes["claim lost"] += 1
        return
    assert claimed.manifest is not None
    for fe in claimed.manifest.files:
        dst = work / str(n) / fe.path.removesuffix(".zst")
        assert dst.resolve().is_relative_to(work.resolve())
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            store.restore_file(claimed, fe.path, str(dst), cap=rng.choice([None, 1 << 20, 64 << 20]))
        except archive.IntegrityError:
            outcomes["restore refused"] += 1
            assert not os.path.lexists(dst), "nothing of a refused file is left"
            continue
        output = dst.read_bytes()
        assert independently_verified(Path(store.root), claimed, fe, output), f"{fe.path} restored unverified"
        assert verified[fe.path], "verify and restore agree"
        outcomes["restore ok"] += 1
    if rng.random() < 0.5:
        store.quarantine(claimed, "fuzz")
    else:
        store.release(claimed, claimed.manifest)


def writers(store: Store, rng: random.Random, outcomes: collections.Counter[str]) -> None:
    try:
        cid, staging = store.new_staging()
        manifest = Manifest(cid, IDENTITIES[0], time.time(), "n1", "stop", "i", "d", {}, {}, [], {})
        outcomes["publish ok" if store.publish(staging, manifest) else "publish older"] += 1
    except UnsafeEntryError:
        outcomes["publish refused"] += 1
    try:
        store.mark_pending(IDENTITIES[1], "fz")
        store.clear_pending(IDENTITIES[1], "fz")
    except UnsafeEntryError:
        outcomes["marker refused"] += 1


def retention(store: Store, rng: random.Random, outcomes: collections.Counter[str]) -> None:
    if rng.random() < 0.3:
        listed = list(store.entries())
        if listed:
            cli.cmd_rm(argparse.Namespace(store=store.root, ids=[rng.choice(listed).id]))
    if rng.random() < 0.3:
        cli.cmd_prune(argparse.Namespace(store=store.root, max_age="1h", max_size="20K"))
        return
    removed = store.prune(
        max_age=rng.choice([None, 30.0, 86400.0]),
        max_bytes=rng.choice([None, 0, 20_000]),
        now=time.time() + rng.choice([0, 7200]),
        grace=rng.choice([0.0, 3600.0]),
    )
    outcomes["pruned"] += len(removed)


def run_case(store_root: Path, work: Path, rng: random.Random, outcomes: collections.Counter[str]) -> None:
    """The entries, then one of the store's users: the CLI, a restore, a writer, retention."""
    store = Store(str(store_root))
    for e in store.entries():
        outcomes[f"entry {e.fault.value if e.fault else 'ok' if e.manifest else 'no-manifest'}"] += 1
    steps: list[Callable[[], None]] = [
        lambda: listing(store, rng, outcomes),
        lambda: restore_path(store, work, rng, outcomes),
        lambda: restore_path(store, work, rng, outcomes),
        lambda: writers(store, rng, outcomes),
        lambda: retention(store, rng, outcomes),
    ]
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        rng.choice(steps)()


@dataclasses.dataclass
class Tally:
    cases: int = 0
    outcomes: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    kinds: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    failures: list[str] = dataclasses.field(default_factory=list)


def fuzz_slice(first: int, step: int) -> Tally:
    """Cases first, first + step, ... below CASES, each from its own seed (SEED and its number,
    whichever process runs it), in a scratch folder of this process."""
    tally = Tally()
    scratch_parent = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="hotrestart-fuzz-", dir=scratch_parent) as tmp:
        top = Path(tmp)
        base, out, cases = top / "base", top / "outside", top / "case"
        (top / "raw").mkdir()
        payloads = build_base(base, top / "raw")
        build_sentinel(out, base)
        before = snapshot(out)
        only = os.environ.get("HOTRESTART_FUZZ_ONLY")
        for n in [int(only)] if only else range(first, CASES, step):
            rng = random.Random(f"{SEED}:{n}")
            shutil.copytree(base, cases / "store", symlinks=True)
            (cases / "work").mkdir()
            case = Case(rng, cases / "store", out, payloads)
            tally.cases += 1
            try:
                case.mutate()
                tally.kinds.update(case.kinds)
                with deadline(CASE_SECONDS):
                    run_case(cases / "store", cases / "work", rng, tally.outcomes)
            except Hang:
                tally.failures.append(f"case {n} ({case.kinds}): hung")
            except DOCUMENTED as exc:
                tally.outcomes[f"raised {type(exc).__name__}"] += 1
            except Exception as exc:
                tally.failures.append(f"case {n} ({case.kinds}): {type(exc).__name__}: {exc}")
            after = snapshot(out)
            if after != before:
                changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
                tally.failures.append(f"case {n} ({case.kinds}): changed outside the store: {changed}")
                shutil.rmtree(out)
                build_sentinel(out, base)
                before = snapshot(out)
            shutil.rmtree(cases)
            if len(tally.failures) >= 20:
                break
    return tally


def test_hostile_stores(capsys: pytest.CaptureFixture[str]) -> None:
    jobs = int(os.environ.get("HOTRESTART_FUZZ_JOBS", str(min(os.cpu_count() or 1, 2))))
    started = time.monotonic()
    if jobs <= 1:
        parts = [fuzz_slice(0, 1)]
    else:
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            parts = list(pool.map(fuzz_slice, range(jobs), [jobs] * jobs))
    took = time.monotonic() - started
    total = Tally()
    for part in parts:
        total.cases += part.cases
        total.outcomes.update(part.outcomes)
        total.kinds.update(part.kinds)
        total.failures += part.failures
    with capsys.disabled():
        print(f"\nstore fuzz: {total.cases} cases, seed {SEED}, {jobs} process(es), {took:.1f}s")
        print("  mutations: " + ", ".join(f"{k} {v}" for k, v in sorted(total.kinds.items())))
        print("  outcomes:  " + ", ".join(f"{k} {v}" for k, v in sorted(total.outcomes.items())))
        print(f"  failures:  {len(total.failures)}")
    assert total.cases >= min(CASES, 10_000) or total.failures or os.environ.get("HOTRESTART_FUZZ_ONLY")
    assert not total.failures, "\n".join(total.failures)
