"""The checkpoint store against generated hostile stores.

Two small valid stores are built once, one without a key and one sealed with a key; every
case copies one of them, applies a few random mutations (manifests with swapped types, huge
numbers, NaN and Infinity, missing and extra fields, odd paths, chunk lists edited
consistently; links to a sentinel folder outside the store, hard links to a file outside,
FIFOs, sockets, devices, in place of entries, files, chunks, chunk folders and chunk spaces;
truncated, swapped, oversized, huge, moved, missing and bomb chunks, chunk spaces renamed,
odd names, deep trees, bad pending markers and owner files) and runs what reads or changes
the store: listing, `hotrestart ls/inspect/verify/rm/prune` (without the key), retention and
chunk collection, a publish and a checkpoint written as chunks, and the restore path's
store-side steps (pending wait, latest, claim, every file restored into a work folder under
a cap). Every case must end with no exception but the documented ones, no hang (a per-case
timer), nothing outside the store written, chmodded or removed (the sentinel and the hard
link's target are compared), no file restored that does not verify (checked independently
of the code under test, the seal included), and no chunk that a usable checkpoint lists
removed by a collection.

HOTRESTART_FUZZ_SEED and HOTRESTART_FUZZ_CASES override the seed and the number of cases.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import hmac
import io
import json
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

import blake3
import pytest
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from storefuzz import IDENTITIES, Case
from storekit import store_file

from hotrestart import cli
from hotrestart.store import archive
from hotrestart.store.chunkwrite import ChunkWriter
from hotrestart.store.entry import Entry
from hotrestart.store.manifest import FileEntry, Identity, Manifest, ManifestError, chunk_root
from hotrestart.store.safefs import UnsafeEntryError
from hotrestart.store.seal import KeyRing
from hotrestart.store.store import Store

SEED = int(os.environ.get("HOTRESTART_FUZZ_SEED", "20261130"))
CASES = int(os.environ.get("HOTRESTART_FUZZ_CASES", "10000"))
CASE_SECONDS = 5.0
DOCUMENTED = (ManifestError, archive.IntegrityError, UnsafeEntryError)


class Hang(Exception):
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


# -- the base stores and the world outside them ------------------------------------------------

KEY = hashlib.sha256(f"hotrestart fuzz key {SEED}".encode()).digest()


def ring() -> KeyRing:
    return KeyRing([("fuzz", KEY)])


def build_base(root: Path, scratch: Path, keys: KeyRing | None) -> None:
    """A store with two published checkpoints, a quarantined, a claimed and a staging one
    (its chunks journalled, not published), a chunk nothing refers to, and pending markers.
    Files are cut in 4 KiB chunks, two thirds zeros: most chunks are shared."""
    store = Store(str(root), keys=keys)
    rng = random.Random(7)
    scratch.mkdir(exist_ok=True)

    def write(staging: str, rels: list[tuple[str, int]], n: int) -> tuple[list[FileEntry], ChunkWriter]:
        writer = store.chunk_writer(staging)
        try:
            files = []
            for rel, size in rels:
                raw = bytes(rng.getrandbits(8) for _ in range(size // 3)) + b"\0" * (size - size // 3)
                src = scratch / f"raw-{n}-{rel.replace('/', '-')}"
                src.write_bytes(raw)
                files.append(store_file(writer, src, rel, chunk=4096))
            writer.finish()
        finally:
            writer.close()
        return files, writer

    for n, ident in enumerate(IDENTITIES[:2] + [Identity("tenant-a", "old", "app")] * 2):
        cid, staging = store.new_staging()
        files, writer = write(staging, [("images/pages-1.img.zst", 9000), ("rootfs-diff.tar.zst", 700)], n)
        manifest = Manifest(
            cid, ident, time.time() - 60 * (4 - n), "n1", "stop", "img", "d", {"criu": "4.2"}, {}, files, {}
        )
        manifest.space, manifest.new_bytes = writer.space, writer.new_bytes
        published = store.publish(staging, manifest, store.sealer(cid))
        assert published is not None
        if n == 2:
            claimed = store.claim(published)
            assert claimed is not None
            store.quarantine(claimed, "CRIU refused")
        if n == 3:
            assert store.claim(published) is not None
    _, staging = store.new_staging()
    write(staging, [("images/pages-1.img.zst", 5000)], 10)
    store.discard(staging)  # its chunks stay, referred to by nothing
    _, staging = store.new_staging()
    (Path(staging) / "partial").write_bytes(b"x" * 100)
    write(staging, [("images/pages-1.img.zst", 6000)], 11)  # being written: journalled
    store.mark_pending(IDENTITIES[0], "stale")
    for marker in (root / "v1" / "pending").iterdir():
        marker.write_text(f"othernode 1 {time.time() - 7200}\n")
    old = time.time() - 7200  # every chunk old enough to be collected when nothing refers to it
    for space, digest in chunk_files(root):
        for name in (digest, ".doomed-" + digest):
            with contextlib.suppress(FileNotFoundError):
                os.utime(root / "v1" / "chunks" / space / digest[:2] / name, (old, old))


def build_sentinel(out: Path, bases: list[Path]) -> None:
    """Outside the store, shaped like it so that a followed link would find things to use:
    an entry, chunk spaces whole, and a chunk."""
    entry = next((bases[0] / "v1" / "checkpoints").glob("*/*"))
    shutil.copytree(entry, out / "entry")
    for base in bases:
        shutil.copytree(base / "v1" / "chunks", out / "chunks", dirs_exist_ok=True)
    shutil.copy(next((out / "chunks" / "plain").glob("*/*")), out / "chunk")
    (out / "precious").write_bytes(b"outside the store")
    (out / "hardlinked").write_bytes(b"a hard link's target")
    (out / "v1").mkdir()
    for p in [out, *out.rglob("*")]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)


def snapshot(out: Path) -> dict[str, tuple[bytes, int, int, int]]:
    found = {}
    top = str(out)
    for dirpath, dirnames, filenames in os.walk(top):  # links to folders are listed, not walked
        names = filenames + dirnames if dirpath != top else ["", *filenames, *dirnames]
        for name in names:
            path = os.path.join(dirpath, name) if name else top
            st = os.lstat(path)
            content = b""
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    content = f.read()
            found[path[len(top) :]] = (content, st.st_mode, st.st_mtime_ns, st.st_uid)
    return found


def chunk_files(root: Path) -> set[tuple[str, str]]:
    """(space, digest) of every chunk file reached with no link on the way, under its name
    or set aside by a collection."""
    found: set[tuple[str, str]] = set()
    top = root / "v1" / "chunks"
    if not _real_dirs(root, top):
        return found
    with os.scandir(top) as spaces:
        for space in [e for e in spaces if e.is_dir(follow_symlinks=False)]:
            with os.scandir(space.path) as fans:
                for fan in [e for e in fans if e.is_dir(follow_symlinks=False)]:
                    with os.scandir(fan.path) as names:
                        for e in names:
                            digest = e.name.removeprefix(".doomed-")
                            if len(digest) == 64 and digest[:2] == fan.name and e.is_file(follow_symlinks=False):
                                found.add((space.name, digest))
    return found


def _real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _real_dirs(root: Path, path: Path) -> bool:
    """Every folder from the store root down to `path` is one, not a link."""
    parts = path.relative_to(root).parts
    return all(_real_dir(root.joinpath(*parts[:i])) for i in range(1, len(parts) + 1))


# -- what runs against each case ---------------------------------------------------------------


def _hkdf(salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(KEY)


def _name_key() -> bytes:
    return _hkdf(b"", b"hotrestart.io/seal/v2 chunk name key\0")


def _authentic(entry: Entry) -> bool:
    """The manifest in the entry's folder carries a MAC of the fuzz key over what it says,
    for the checkpoint its folder names (seal.py's scheme, computed here from its definition)."""
    try:
        data = json.loads((Path(entry.path) / "manifest.json").read_bytes())
        info = data["seal"]
        mac_key = _hkdf(bytes.fromhex(info["salt"]), b"hotrestart.io/seal/v1 manifest key\0" + entry.id.encode())
        body = dict(data, seal={k: v for k, v in info.items() if k != "mac"})
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
        return hmac.compare_digest(hmac.digest(mac_key, text.encode(), "sha256").hex(), info["mac"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def independently_verified(store_root: Path, entry: Entry, fe: FileEntry, output: bytes, sealed: bool) -> bool:
    """Whether `output` is what the manifest and the stored chunks honestly give: every chunk
    a regular file in the store (no link on the way), of its declared size, opened with the
    key when the store has one, decompressed to its declared size, and named for its bytes."""
    assert entry.manifest is not None
    space = entry.manifest.space
    name_key = _name_key() if sealed else None
    if sealed:
        expected = "k-" + hmac.digest(name_key, b"space", "sha256").hex()[:24]  # type: ignore[arg-type]
        if space != expected or not _authentic(entry):
            return False
    elif space != "plain" or entry.manifest.seal:
        return False
    if chunk_root(fe.chunks) != fe.digest or sum(c.raw for c in fe.chunks) != fe.raw_bytes:
        return False
    aead = AESGCM(_hkdf(b"", b"hotrestart.io/seal/v2 chunk key\0")) if sealed else None
    decoded = []
    for c in fe.chunks:
        fan = store_root / "v1" / "chunks" / space / c.digest[:2]
        if not _real_dirs(store_root, fan):
            return False
        names = [n for n in (c.digest, ".doomed-" + c.digest) if os.path.lexists(fan / n)]
        if not names:
            return False
        st = os.lstat(fan / names[0])
        if not stat.S_ISREG(st.st_mode) or st.st_size != c.stored:
            return False
        data = (fan / names[0]).read_bytes()
        digest = bytes.fromhex(c.digest)
        if aead is not None:
            try:
                data = aead.decrypt(digest[:12], data, b"hotrestart.io/seal/v2 chunk\0" + digest)
            except InvalidTag:
                return False
        try:
            with zstandard.ZstdDecompressor().stream_reader(data) as reader:
                part = reader.read(c.raw + 1)
                while len(part) <= c.raw:
                    more = reader.read(c.raw + 1 - len(part))
                    if not more:
                        break
                    part += more
        except zstandard.ZstdError:
            return False
        named = blake3.blake3(part, key=name_key) if name_key is not None else blake3.blake3(part)
        if len(part) != c.raw or named.hexdigest() != c.digest:
            return False
        decoded.append(part)
    return b"".join(decoded) == output


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
    """What a create and a start do with the store: wait, latest, claim, restore, settle.
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
        sealed = store.keys is not None
        assert independently_verified(Path(store.root), claimed, fe, output, sealed), f"{fe.path} restored unverified"
        assert verified[fe.path], "verify and restore agree"
        outcomes["restore ok"] += 1
    if rng.random() < 0.5:
        store.quarantine(claimed, "fuzz")
    else:
        store.release(claimed, claimed.manifest)


def writers(store: Store, work: Path, rng: random.Random, outcomes: collections.Counter[str]) -> None:
    """A publish of no files, a checkpoint written as chunks (most of them already in the
    store), restored right after; pending markers."""
    try:
        cid, staging = store.new_staging()
        manifest = Manifest(cid, IDENTITIES[0], time.time(), "n1", "stop", "i", "d", {}, {}, [], {})
        if store.keys is not None and rng.random() < 0.5:  # else "plain": wrong for a sealed store, and no file to read
            manifest.space = store.keys.chunk_keys(store.keys.active).space
        outcomes["publish ok" if store.publish(staging, manifest, store.sealer(cid)) else "publish older"] += 1
    except (UnsafeEntryError, ManifestError):
        outcomes["publish refused"] += 1
    payload = b"\0" * rng.choice([0, 4096, 8192, 20_000]) + os.urandom(rng.choice([0, 100, 5000]))
    src = work / "written.img"
    src.write_bytes(payload)
    try:
        cid, staging = store.new_staging()
        writer = store.chunk_writer(staging)
        try:
            fe = store_file(writer, src, "images/pages-1.img.zst", chunk=4096)
            writer.finish()
        finally:
            writer.close()
        manifest = Manifest(cid, IDENTITIES[1], time.time() + 1, "n1", "stop", "i", "d", {}, {}, [fe], {})
        manifest.space, manifest.new_bytes = writer.space, writer.new_bytes
        entry = store.publish(staging, manifest, store.sealer(cid))
    except UnsafeEntryError:
        outcomes["chunked publish refused"] += 1
        return
    except OSError:  # a chunk could not be written (seen by another thread as refused): no checkpoint
        outcomes["chunked publish failed"] += 1
        return
    if entry is None:  # a mutation dated one of the identity's checkpoints in the future
        outcomes["chunked publish older"] += 1
        return
    outcomes["chunked publish ok"] += 1
    dst = work / "written.out"
    try:
        store.restore_file(entry, fe.path, str(dst))
    except archive.IntegrityError:  # a damaged chunk of the same bytes was found and shared
        outcomes["written restore refused"] += 1
        assert not os.path.lexists(dst)
    else:
        assert dst.read_bytes() == payload, "what was just written restores as written"
        outcomes["written restore ok"] += 1
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
    if rng.random() < 0.3:
        chunks, _ = store.collect(now=time.time() + rng.choice([0, 7200]), min_age=rng.choice([0.0, 600.0]))
        outcomes["chunks collected"] += chunks
        return
    removed = store.prune(
        max_age=rng.choice([None, 30.0, 86400.0]),
        max_bytes=rng.choice([None, 0, 20_000]),
        now=time.time() + rng.choice([0, 7200]),
        grace=rng.choice([0.0, 3600.0]),
    )
    outcomes["pruned"] += len(removed)
    outcomes["chunks collected"] += store.collected[0]


STEPS = ["listing", "restore", "restore", "writers", "retention"]


def run_case(
    store_root: Path,
    work: Path,
    keys: KeyRing | None,
    step: str,
    rng: random.Random,
    outcomes: collections.Counter[str],
) -> None:
    """The entries, then one of the store's users (`step`): the CLI, a restore, a writer, retention."""
    store = Store(str(store_root), keys=keys)
    for e in store.entries():
        outcomes[f"entry {e.fault.value if e.fault else 'ok' if e.manifest else 'no-manifest'}"] += 1
    steps: dict[str, Callable[[], None]] = {
        "listing": lambda: listing(store, rng, outcomes),
        "restore": lambda: restore_path(store, work, rng, outcomes),
        "writers": lambda: writers(store, work, rng, outcomes),
        "retention": lambda: retention(store, rng, outcomes),
    }
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        steps[step]()


def in_use(store_root: Path, keys: KeyRing | None) -> set[tuple[str, str]]:
    """The chunks that the store's usable checkpoints list."""
    return {
        (e.manifest.space, c.digest)
        for e in Store(str(store_root), keys=keys).entries()
        if e.manifest is not None and e.fault is None
        for fe in e.manifest.files
        for c in fe.chunks
    }


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
        bases = {False: top / "base-plain", True: top / "base-sealed"}
        out, cases = top / "outside", top / "case"
        for sealed, base in bases.items():
            build_base(base, top / "raw", ring() if sealed else None)
        build_sentinel(out, list(bases.values()))
        before = snapshot(out)
        spaces = sorted(p.name for p in (out / "chunks").iterdir())
        only = os.environ.get("HOTRESTART_FUZZ_ONLY")
        for n in [int(only)] if only else range(first, CASES, step):
            rng = random.Random(f"{SEED}:{n}")
            sealed = rng.random() < 0.3
            keys = ring() if sealed else None
            shutil.copytree(bases[sealed], cases / "store", symlinks=True)
            (cases / "work").mkdir()
            case = Case(rng, cases / "store", out, spaces)
            tally.cases += 1
            tally.outcomes["sealed store" if sealed else "plain store"] += 1
            user = rng.choice(STEPS)
            present: set[tuple[str, str]] = set()
            try:
                case.mutate()
                tally.kinds.update(case.kinds)
                if user == "retention":  # the only one that collects chunks
                    present = chunk_files(cases / "store")
                with deadline(CASE_SECONDS):
                    run_case(cases / "store", cases / "work", keys, user, rng, tally.outcomes)
            except Hang:
                tally.failures.append(f"case {n} ({case.kinds}): hung")
            except DOCUMENTED as exc:
                tally.outcomes[f"raised {type(exc).__name__}"] += 1
            except Exception as exc:
                tally.failures.append(f"case {n} ({case.kinds}): {type(exc).__name__}: {exc}")
            try:
                with deadline(CASE_SECONDS):
                    lost = (
                        (in_use(cases / "store", keys) & present) - chunk_files(cases / "store") if present else set()
                    )
                if lost:
                    tally.failures.append(f"case {n} ({case.kinds}): chunks in use were removed: {sorted(lost)[:3]}")
            except (Hang, Exception) as exc:
                tally.failures.append(f"case {n} ({case.kinds}): listing it afterwards: {type(exc).__name__}: {exc}")
            after = snapshot(out)
            if after != before:
                changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
                tally.failures.append(f"case {n} ({case.kinds}): changed outside the store: {changed}")
                shutil.rmtree(out)
                build_sentinel(out, list(bases.values()))
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
