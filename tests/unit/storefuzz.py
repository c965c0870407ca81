"""Hostile stores for the store fuzzer: the identities it uses and the mutations it applies to a valid store."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import blake3
import zstandard

from hotrestart.store.entry import identity_key
from hotrestart.store.manifest import SCHEMA, Chunk, Identity, chunk_root

HEX = "0123456789abcdef"

IDENTITIES = [
    Identity("tenant-a", "web-0", "app"),
    Identity("tenant-b", "web-0", "app", key="shared"),
    Identity("tenant-c", "web-0", "app", key="shared"),  # never published: must find nothing
]


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
def _bomb(size: int, window_log: int) -> bytes:
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=window_log)
    return zstandard.ZstdCompressor(compression_params=params).compress(b"\0" * size)


@functools.cache
def _zeros_digest(size: int) -> str:
    return blake3.blake3(b"\0" * size).hexdigest()


def _dump(data: Any) -> str:
    # Python's json writes NaN and Infinity; a marker string becomes the bare literal.
    text = json.dumps(data)
    return text.replace('"NaN"', "NaN").replace('"Infinity"', "Infinity")


class Case:
    def __init__(self, rng: random.Random, root: Path, out: Path, spaces: list[str]) -> None:
        self.rng = rng
        self.root = root
        self.out = out  # the sentinel: outside the store, shaped like it
        self.spaces = spaces  # the chunk spaces the sentinel has copies of
        self.kinds: list[str] = []

    # Places in the tree ----------------------------------------------------------------------

    def inside(self, path: Path) -> bool:
        """No link on the way from the store root: the harness itself must not write outside."""
        at = str(self.root)
        rel = str(path)[len(at) :]
        if not str(path).startswith(at) or (rel and rel[0] != "/"):
            raise ValueError(f"{path} is not in the store")
        for part in rel.split("/")[1:]:
            at += "/" + part
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

    def chunk_dirs(self) -> list[Path]:
        """The chunk spaces and their fan folders (whatever they hold)."""
        spaces = [s for s in self._dirs(self.root / "v1" / "chunks") if self._real_dir(s)]
        return spaces + [f for s in spaces for f in self._dirs(s) if self._real_dir(f)]

    def _real_dir(self, path: Path) -> bool:
        """A folder, not a link to one, with no link on the way."""
        try:
            return self.inside(path) and stat.S_ISDIR(os.lstat(path).st_mode)
        except OSError:
            return False

    def chunks(self) -> list[Path]:
        """Every regular file among the chunks (doomed ones and odd names included)."""
        found = [c for d in self.chunk_dirs() if d.parent.name != "chunks" for c in self._dirs(d)]
        return [p for p in found if self.inside(p) and stat.S_ISREG(os.lstat(p).st_mode)]

    def positions(self) -> list[Path]:
        v1 = self.root / "v1"
        places = [v1, *(v1 / s for s in ("checkpoints", "claimed", "quarantine", "staging", "pending", "chunks"))]
        places += self._dirs(v1 / "checkpoints") + self._dirs(v1 / "pending") + [v1 / "gc.lock"]
        for e in self.entries():
            places += [e, *self._tree(e)]
        # The chunks are as many as the rest together: a chunk position is as likely as any other.
        chunk_places = self.chunk_dirs() + self.chunks()
        places += self.rng.sample(chunk_places, min(len(chunk_places), len(places)))
        return [p for p in places if self.inside(p.parent)]

    def manifests(self) -> list[Path]:
        found = [e / "manifest.json" for e in self.entries()]
        return [p for p in found if self.inside(p) and stat.S_ISREG(os.lstat(p).st_mode)]

    def stored(self) -> list[Path]:
        """The chunk files under their own names (what a restore reads), but for huge ones."""
        return [p for p in self.chunks() if len(p.name) == 64 and os.lstat(p).st_size <= 256 << 20]

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
            (10, self.chunk_damage),
            (5, self.bomb),
            (4, self.manifest_chunks),
            (3, self.chunk_space),
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
        dests = ["", "entry", "precious", "v1", "chunk", "chunks", *(f"chunks/{s}" for s in self.spaces)]
        dest = self.out / self.rng.choice(dests)
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
        os.link(self.out / self.rng.choice(["hardlinked", "entry/manifest.json", "chunk"]), target)
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
        choice = self.rng.randrange(8)
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
        elif choice == 3:
            put(target, b"")
            os.truncate(target, self.rng.choice([1 << 30, 1 << 40]))  # sparse: only what is declared is read
            self.kinds.append("chunk-huge")
        elif choice == 4:
            target.rename(target.with_name(".doomed-" + target.name))  # a collection under way
            self.kinds.append("chunk-doomed")
        elif choice == 5:
            target.unlink()
            self.kinds.append("chunk-missing")
        elif choice == 6:
            target.rename(self.rng.choice(self.chunk_dirs()) / target.name)  # another fan or space
            self.kinds.append("chunk-moved")
        elif data:
            flipped = bytearray(data)
            flipped[self.rng.randrange(len(flipped))] ^= 1 << self.rng.randrange(8)
            put(target, bytes(flipped))
            self.kinds.append("chunk-flipped")

    def chunk_space(self) -> None:
        """A space folder renamed: its chunks where another key's (or no key's) belong."""
        spaces = self._dirs(self.root / "v1" / "chunks")
        if not spaces:
            return
        source = self.rng.choice(spaces)
        name = self.rng.choice(["plain", "k-" + "".join(self.rng.choice(HEX) for _ in range(24)), "k-x", ".."])
        dest = source.parent / name
        if name != ".." and os.path.lexists(dest):
            self._replace(dest)
        with contextlib.suppress(OSError):
            source.rename(dest)
        self.kinds.append("chunk-space")

    def manifest_chunks(self) -> None:
        """A chunk list edited consistently (sizes and file digest recomputed): the chunks
        of other files, repeated, dropped or made up; what is restored must still verify."""
        got = self._manifest()
        if got is None or not isinstance(got[1].get("files"), list):
            return
        path, data = got
        entries = [f for f in data["files"] if isinstance(f, dict) and isinstance(f.get("chunks"), list)]
        pool = [c for f in entries for c in f["chunks"] if isinstance(c, dict)]
        if not entries or not pool:
            return
        entry = self.rng.choice(entries)
        chunks = list(entry["chunks"])
        choice = self.rng.randrange(4)
        if choice == 0:
            chunks = [dict(self.rng.choice(pool)) for _ in range(self.rng.randrange(1, 5))]
        elif choice == 1 and chunks:
            chunks.pop(self.rng.randrange(len(chunks)))
        elif choice == 2:
            chunks = chunks * 2
        else:
            made_up = "".join(self.rng.choice(HEX) for _ in range(64))
            chunks.append({"stored": self.rng.choice([1, 100, 4096]), "raw": 4096, "digest": made_up})
        try:
            built = [Chunk(**c) for c in chunks]
            entry.update(
                chunks=chunks,
                digest=chunk_root(built),
                stored_bytes=sum(c.stored for c in built),
                raw_bytes=sum(c.raw for c in built),
            )
        except (TypeError, ValueError):
            return
        self.kinds.append("manifest-chunks")
        self._write(path, data)

    def bomb(self) -> None:
        """A chunk that decompresses far beyond what it declares, named for the bytes it declares."""
        got = self._manifest()
        if got is None or not isinstance(got[1].get("files"), list) or not got[1]["files"]:
            return
        path, data = got
        entry = data["files"][0]
        space = data.get("space")
        if not isinstance(entry, dict) or not isinstance(space, str) or "/" in space or space in ("", ".", ".."):
            return
        frame = _bomb(self.rng.choice([1 << 20, 16 << 20, 80 << 20]), self.rng.choice([17, 20, 27]))
        declared = self.rng.choice([4096, 1 << 20, 64 << 20])
        digest = _zeros_digest(declared)
        fan = self.root / "v1" / "chunks" / space / digest[:2]
        if not self.inside(fan.parent):
            return
        with contextlib.suppress(OSError):
            fan.mkdir(exist_ok=True)
            if self.inside(fan / digest):  # not through a link planted as the fan
                put(fan / digest, frame)
        chunk = Chunk(stored=len(frame), raw=declared, digest=digest)
        entry.update(
            chunks=[chunk.__dict__],
            digest=chunk_root([chunk]),
            stored_bytes=len(frame),
            raw_bytes=declared,
        )
        self.kinds.append("bomb")
        self._write(path, data)

    def odd_name(self) -> None:
        found = self.entries() + self.chunk_dirs() + self.chunks()
        if not found:
            return
        target = self.rng.choice(found)
        name = self.rng.choice(["a b", "..x", "é", "-", "x" * 250, ".hidden"])
        with contextlib.suppress(OSError):
            target.rename(target.parent / name)
        self.kinds.append("odd-name")

    def deep_tree(self) -> None:
        found = self.entries() + self.chunk_dirs()
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
        found = self.entries() + self.chunk_dirs()
        if not found:
            return
        target = self.rng.choice(found)
        shutil.rmtree(target)
        target.write_bytes(b"not a folder")
        self.kinds.append("entry-is-file")
