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
import functools
import hashlib
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
from typing import Any

import pytest
import zstandard

from hotrestart import cli
from hotrestart.store import archive
from hotrestart.store.entry import Entry, identity_key
from hotrestart.store.manifest import SCHEMA, Chunk, FileEntry, Identity, Manifest, ManifestError, chunk_root
from hotrestart.store.safefs import UnsafeEntryError
from hotrestart.store.store import Store

SEED = int(os.environ.get("HOTRESTART_FUZZ_SEED", "20261130"))
CASES = int(os.environ.get("HOTRESTART_FUZZ_CASES", "10000"))
CASE_SECONDS = 5.0
DOCUMENTED = (ManifestError, archive.IntegrityError, UnsafeEntryError)

IDENTITIES = [
    Identity("tenant-a", "web-0", "app"),
    Identity("tenant-b", "web-0", "app", key="shared"),
    Identity("tenant-c", "web-0", "app", key="shared"),  # never published: must find nothing
]


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


# -- mutations ----------------------------------------------------------------------------------


def _values(rng: random.Random) -> list[Any]:
    return [
        1,
        -1,
        0,
        10**30,
        -(10**30),
        2**63,
        1.5,
        True,
        None,
        "",
        "x" * rng.choice([1, 300, 5000]),
        "../../etc",
        "\x1b[2J",
        [],
        [1, "a"],
        {},
        {"a": 1},
        "NaN",
        "Infinity",
    ]


def _nodes(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    yield path, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _nodes(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _nodes(v, (*path, i))


def _set(data: Any, path: tuple[Any, ...], value: Any) -> None:
    for step in path[:-1]:
        data = data[step]
    data[path[-1]] = value


def put(path: Path, data: bytes) -> None:
    """Replace a file's content with a new file: the harness must not write through a hard
    link it planted itself."""
    tmp = path.with_name(path.name + ".fuzz-tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@functools.cache
def _bomb(size: int) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(b"\0" * size)


def _dump(data: Any) -> str:
    # Python's json writes NaN and Infinity; a marker string becomes the bare literal.
    text = json.dumps(data)
    return text.replace('"NaN"', "NaN").replace('"Infinity"', "Infinity")


class Case:
    def __init__(self, rng: random.Random, root: Path, out: Path, payloads: dict[str, bytes]) -> None:
        self.rng = rng
        self.root = root
        self.out = out
        self.payloads = payloads
        self.kinds: list[str] = []

    # Places in the tree ----------------------------------------------------------------------

    def inside(self, path: Path) -> bool:
        """No link on the way from the store root: the harness itself must not write outside."""
        rel = path.relative_to(self.root)
        at = self.root
        for part in rel.parts:
            at = at / part
            try:
                if stat.S_ISLNK(os.lstat(at).st_mode):
                    return False
            except OSError:
                return False
        return True

    def _dirs(self, path: Path) -> list[Path]:
        if not self.inside(path) or not stat.S_ISDIR(os.lstat(path).st_mode):
            return []
        return sorted(path.iterdir())

    def entries(self) -> list[Path]:
        v1 = self.root / "v1"
        found: list[Path] = []
        for state in ("claimed", "quarantine", "staging"):
            found += self._dirs(v1 / state)
        for key in self._dirs(v1 / "checkpoints"):
            found += self._dirs(key)
        return [p for p in found if self.inside(p) and stat.S_ISDIR(os.lstat(p).st_mode)]

    def _tree(self, top: Path) -> list[Path]:
        found = []
        for dirpath, dirnames, filenames in os.walk(top):  # links to folders are not walked
            found += [Path(dirpath) / n for n in dirnames + filenames]
        return found

    def positions(self) -> list[Path]:
        v1 = self.root / "v1"
        places = [v1, *(v1 / s for s in ("checkpoints", "claimed", "quarantine", "staging", "pending"))]
        places += self._dirs(v1 / "checkpoints") + self._dirs(v1 / "pending")
        for e in self.entries():
            places += [e, *self._tree(e)]
        return [p for p in places if self.inside(p.parent)]

    def manifests(self) -> list[Path]:
        found = [e / "manifest.json" for e in self.entries()]
        return [p for p in found if self.inside(p) and stat.S_ISREG(os.lstat(p).st_mode)]

    def stored(self) -> list[Path]:
        found = [p for e in self.entries() for p in self._tree(e) if p.name.endswith(".zst")]
        return [p for p in found if self.inside(p) and stat.S_ISREG(os.lstat(p).st_mode)]

    # Mutations -------------------------------------------------------------------------------

    def mutate(self) -> None:
        ops: list[tuple[int, Callable[[], None]]] = [
            (30, self.manifest_value),
            (6, self.manifest_drop_or_add),
            (6, self.manifest_path),
            (6, self.manifest_time),
            (4, self.manifest_schema),
            (5, self.manifest_bytes),
            (4, self.manifest_identity),
            (12, self.link),
            (4, self.hard_link),
            (8, self.special),
            (8, self.chunk_damage),
            (5, self.bomb),
            (3, self.odd_name),
            (2, self.deep_tree),
            (4, self.marker),
            (3, self.owner),
            (3, self.replace_with_file),
        ]
        total = sum(w for w, _ in ops)
        for _ in range(self.rng.choice([1, 1, 2, 3])):
            pick = self.rng.uniform(0, total)
            for weight, op in ops:
                pick -= weight
                if pick <= 0:
                    with contextlib.suppress(OSError):  # a mutation that no longer fits the tree
                        op()
                    break

    def _manifest(self) -> tuple[Path, dict[str, Any]] | None:
        found = self.manifests()
        if not found:
            return None
        path = self.rng.choice(found)
        try:
            return path, json.loads(path.read_text())
        except (ValueError, RecursionError):
            return None

    def _write(self, path: Path, data: Any) -> None:
        put(path, _dump(data).encode())

    def manifest_value(self) -> None:
        got = self._manifest()
        if got is None:
            return
        path, data = got
        nodes = [p for p, _ in _nodes(data) if p]
        where = self.rng.choice(nodes)
        _set(data, where, self.rng.choice(_values(self.rng)))
        self.kinds.append("manifest-type")
        self._write(path, data)

    def manifest_drop_or_add(self) -> None:
        got = self._manifest()
        if got is None:
            return
        path, data = got
        holders = [(p, v) for p, v in _nodes(data) if isinstance(v, dict) and v]
        _where, holder = self.rng.choice(holders)
        if self.rng.random() < 0.5:
            holder.pop(self.rng.choice(list(holder)))
            self.kinds.append("manifest-missing")
        else:
            holder[self.rng.choice(["extra", "seal", "x" * 200])] = self.rng.choice(_values(self.rng))
            self.kinds.append("manifest-extra")
        self._write(path, data)

    def manifest_path(self) -> None:
        got = self._manifest()
        if got is None or not isinstance(got[1].get("files"), list) or not got[1]["files"]:
            return
        path, data = got
        bad = ["../x.zst", "/etc/passwd", "images/../../x", "", "a//b", "manifest.json", "images", "owner"]
        bad += [".hidden", "x" * 300, "images/\x00", "images/pages-1.img.zst/x", "rootfs-diff.tar"]
        entry = self.rng.choice(data["files"])
        if isinstance(entry, dict):
            entry["path"] = self.rng.choice(bad)
        self.kinds.append("manifest-path")
        self._write(path, data)

    def manifest_time(self) -> None:
        got = self._manifest()
        if got is None:
            return
        path, data = got
        data["created_at"] = self.rng.choice(
            ["Infinity", "NaN", -1.0, 1e300, time.time() + 3 * 86400, time.time() + 3600, 0, True]
        )
        self.kinds.append("manifest-time")
        self._write(path, data)

    def manifest_schema(self) -> None:
        got = self._manifest()
        if got is None:
            return
        path, data = got
        data["schema"] = self.rng.choice(["hotrestart.io/checkpoint/v2", "other", 1, None, SCHEMA + "x"])
        self.kinds.append("manifest-schema")
        self._write(path, data)

    def manifest_bytes(self) -> None:
        found = self.manifests()
        if not found:
            return
        path = self.rng.choice(found)
        choice = self.rng.randrange(5)
        if choice == 0:
            text = path.read_bytes()
            put(path, text[: self.rng.randrange(len(text))])
        elif choice == 1:
            put(path, bytes(self.rng.getrandbits(8) for _ in range(self.rng.randrange(200))))
        elif choice == 2:
            put(path, b"")
            os.truncate(path, 17 << 20)  # sparse: cheap to make, refused before it is read
        elif choice == 3:
            put(path, ("[" * 50_000 + "]" * 50_000).encode())
        else:
            put(path, ('{"schema": "' + SCHEMA + '", "files": ' + "[" * 30 + "]" * 30 + "}").encode())
        self.kinds.append("manifest-bytes")

    def manifest_identity(self) -> None:
        got = self._manifest()
        if got is None:
            return
        path, data = got
        data["identity"] = {
            "namespace": self.rng.choice(["tenant-a", "tenant-b", "tenant-c", ""]),
            "pod": "web-0",
            "container": "app",
            "key": self.rng.choice(["", "shared"]),
        }
        self.kinds.append("manifest-identity")
        self._write(path, data)

    def _replace(self, target: Path) -> None:
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif os.path.lexists(target):
            target.unlink()

    def link(self) -> None:
        target = self.rng.choice(self.positions() or [self.root / "v1"])
        dest = self.rng.choice([self.out, self.out / "entry", self.out / "precious", self.out / "v1"])
        self._replace(target)
        with contextlib.suppress(FileNotFoundError):
            target.symlink_to(dest)
        self.kinds.append("symlink")

    def hard_link(self) -> None:
        files = self.stored() + self.manifests()
        if not files:
            return
        target = self.rng.choice(files)
        target.unlink()
        os.link(
            self.out / self.rng.choice(["hardlinked", "entry/manifest.json", "entry/images/pages-1.img.zst"]), target
        )
        self.kinds.append("hardlink")

    def special(self) -> None:
        target = self.rng.choice(self.positions() or [self.root / "v1"])
        self._replace(target)
        kind = self.rng.choice(["fifo", "socket", "device"])
        with contextlib.suppress(FileNotFoundError):
            if kind == "fifo":
                os.mkfifo(target, 0o600)
            elif kind == "socket":
                os.mknod(target, stat.S_IFSOCK | 0o600)
            else:
                try:
                    os.mknod(target, stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero: endless
                except PermissionError:
                    os.mkfifo(target, 0o600)
                    kind = "fifo"
        self.kinds.append(kind)

    def chunk_damage(self) -> None:
        files = self.stored()
        if not files:
            return
        target = self.rng.choice(files)
        data = target.read_bytes()
        choice = self.rng.randrange(4)
        if choice == 0 and data:
            put(target, data[: self.rng.randrange(len(data))])
            self.kinds.append("chunk-truncated")
        elif choice == 1:
            other = self.rng.choice(files)
            put(target, other.read_bytes())
            self.kinds.append("chunk-swapped")
        elif choice == 2:
            put(target, data + b"\0" * self.rng.choice([1, 4096, 1 << 20]))
            self.kinds.append("chunk-oversized")
        elif data:
            flipped = bytearray(data)
            flipped[self.rng.randrange(len(flipped))] ^= 1 << self.rng.randrange(8)
            put(target, bytes(flipped))
            self.kinds.append("chunk-flipped")

    def bomb(self) -> None:
        """A frame that decompresses far beyond what it declares, with hashes that match."""
        got = self._manifest()
        if got is None or not isinstance(got[1].get("files"), list) or not got[1]["files"]:
            return
        path, data = got
        entry = data["files"][0]
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            return
        frame = _bomb(self.rng.choice([1 << 20, 16 << 20, 80 << 20]))
        declared = self.rng.choice([4096, 1 << 20, 64 << 20])
        target = path.parent / entry["path"]
        if not self.inside(target.parent):
            return
        with contextlib.suppress(OSError):
            put(target, frame)
        chunk = Chunk(stored=len(frame), raw=declared, sha256=hashlib.sha256(frame).hexdigest())
        entry.update(
            chunks=[chunk.__dict__],
            sha256=chunk_root([chunk]),
            stored_bytes=len(frame),
            raw_bytes=declared,
        )
        self.kinds.append("bomb")
        self._write(path, data)

    def odd_name(self) -> None:
        found = self.entries()
        if not found:
            return
        target = self.rng.choice(found)
        name = self.rng.choice(["a b", "..x", "é", "-", "x" * 250, ".hidden"])
        with contextlib.suppress(OSError):
            target.rename(target.parent / name)
        self.kinds.append("odd-name")

    def deep_tree(self) -> None:
        found = self.entries()
        if not found:
            return
        path = self.rng.choice(found)
        for _ in range(40):
            path = path / "d"
        path.mkdir(parents=True)
        (path / "leaf").write_bytes(b"x")
        self.kinds.append("deep-tree")

    def marker(self) -> None:
        pending = self.root / "v1" / "pending"
        if not self.inside(pending) or not pending.is_dir():
            return
        ident = self.rng.choice(IDENTITIES)
        text = self.rng.choice(
            [
                f"othernode 1 {time.time() + 1e6}",
                f"othernode 1 {time.time() - 1}",
                "othernode 1 nan",
                "othernode -1 inf",
                f"{os.uname().nodename} 0 {time.time()}",
                f"{os.uname().nodename} -1 {time.time()}",
                "garbage",
                "x" * 100_000,
            ]
        )
        put((pending / f"{identity_key(ident)}.c{self.rng.randrange(9)}"), (text).encode())
        self.kinds.append("marker")

    def owner(self) -> None:
        found = [e for e in self.entries() if e.parent.name in ("staging", "claimed")]
        if not found:
            return
        target = self.rng.choice(found) / "owner"
        if not self.inside(target.parent):
            return
        text = self.rng.choice([f"{os.uname().nodename} 0", f"{os.uname().nodename} -1", "x y z", "", "h 99999999"])
        with contextlib.suppress(OSError):
            self._replace(target)
            put(target, (text).encode())
        self.kinds.append("owner")

    def replace_with_file(self) -> None:
        found = self.entries()
        if not found:
            return
        target = self.rng.choice(found)
        shutil.rmtree(target)
        target.write_bytes(b"not a folder")
        self.kinds.append("entry-is-file")


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
