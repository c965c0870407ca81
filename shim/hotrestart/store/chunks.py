"""The directory store's chunks: content-addressed files shared by every checkpoint.

Layout: `v1/chunks/<space>/<aa>/<digest>`, where `<space>` is `plain` or the store key's
(`chunkcodec`), `<aa>` the digest's first two hex digits. A chunk file is written under a
temporary name, made durable, and renamed into place, so a chunk name always holds a whole
chunk; the same digest written twice is the same bytes, and the second rename is harmless.

Removal (`chunkgc`) first renames a chunk to `.doomed-<digest>` and puts it back if a
reference turns up: a reader that finds the name gone looks there too.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import re
import secrets
import stat
import threading
from collections.abc import Iterator

from hotrestart.store import safefs
from hotrestart.store.chunkcodec import IntegrityError
from hotrestart.store.direct import DirectOutput
from hotrestart.store.manifest import MAX_CHUNK_STORED
from hotrestart.store.safefs import UnsafeEntryError
from hotrestart.store.tree import Tree

DIGEST = re.compile(r"[0-9a-f]{64}")
SPACE = re.compile(r"plain|k-[0-9a-f]{24}")
DOOMED = ".doomed-"
REFS = "chunks.refs"  # in a staging folder: every chunk the checkpoint being written uses

_local = threading.local()


def _staging_buffer() -> mmap.mmap:
    """This thread's aligned buffer for direct writes, made once: a fresh one per chunk
    would cost its page faults every time."""
    buf: mmap.mmap | None = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = mmap.mmap(-1, 8 << 20)
    return buf


def check(space: str, digest: str) -> None:
    if not SPACE.fullmatch(space) or not DIGEST.fullmatch(digest):
        raise UnsafeEntryError(f"{space}/{digest[:80]}", "is not a chunk name the store writes")


class Chunks:
    def __init__(self, tree: Tree) -> None:
        self.tree = tree

    @contextlib.contextmanager
    def folder(self, space: str, digest: str, *, create: bool = False) -> Iterator[int]:
        """The folder that holds (or will hold) the chunk, reached step by step."""
        check(space, digest)
        with self.tree.at("chunks", space, digest[:2], create=create) as fd:
            yield fd

    def stored_size(self, space: str, digest: str) -> int | None:
        """The stored size of a chunk the store holds, or None; anything but a regular file
        in its place counts as absent (and is replaced when the chunk is written)."""
        try:
            with self.folder(space, digest) as fd:
                # Not under its doomed name: a writer must write such a chunk again (chunkgc).
                # Nor anything but a chunk file of a size the store writes: written again too.
                st = os.stat(digest, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and 0 < st.st_size <= MAX_CHUNK_STORED:
                    return st.st_size
        except (FileNotFoundError, UnsafeEntryError):
            return None
        return None

    def put(self, space: str, digest: str, data: bytes) -> None:
        """Store a chunk durably (its folder's entry is synced by `sync`)."""
        with self.folder(space, digest, create=True) as fd:
            tmp = f".tmp-{digest[:16]}-{secrets.token_hex(6)}"
            out = DirectOutput(tmp, dir_fd=fd, buffer=_staging_buffer())
            try:
                try:
                    out.write(data)
                    out.finish()
                finally:
                    out.close()
                try:
                    os.rename(tmp, digest, src_dir_fd=fd, dst_dir_fd=fd)
                except IsADirectoryError:
                    safefs.remove_tree(fd, digest)  # not a chunk the store wrote
                    os.rename(tmp, digest, src_dir_fd=fd, dst_dir_fd=fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=fd)
                raise

    def renew(self) -> None:
        pass  # a writer here is known by its journal, which does not lapse

    def sync(self, space: str, fans: set[str]) -> None:
        """Make the renames of chunks written into the folders `fans` durable."""
        for fan in sorted(fans):
            with self.tree.at("chunks", space, fan) as fd:
                safefs.fsync(fd)
        with self.tree.at("chunks", space) as fd:
            safefs.fsync(fd)

    def read(self, space: str, digest: str, size: int) -> bytes:
        """A chunk's stored bytes, which must be `size` long; a chunk being removed is read
        from where removal put it, and one put back meanwhile from its name again."""
        if not 0 < size <= MAX_CHUNK_STORED:
            raise IntegrityError(f"chunk {digest[:16]}: {size} bytes stored is out of range")
        try:
            with self.folder(space, digest) as fd:
                for name in (digest, DOOMED + digest, digest):
                    try:
                        cfd = safefs.open_file(fd, name)
                    except FileNotFoundError:
                        continue
                    try:
                        # No links: 0 is a chunk replaced or removed since it was opened,
                        # whose bytes are still whole (chunks are renamed in complete).
                        if os.fstat(cfd).st_nlink > 1:
                            raise UnsafeEntryError(name, "is hard-linked elsewhere")
                        # Read, not mapped: another node could truncate the file, and a
                        # mapping would turn that into SIGBUS.
                        data = os.pread(cfd, size + 1, 0)
                    finally:
                        os.close(cfd)
                    if len(data) != size:
                        raise IntegrityError(f"chunk {digest[:16]}: {len(data)} bytes stored, the manifest says {size}")
                    return data
        except UnsafeEntryError as exc:
            raise IntegrityError(f"chunk {digest[:16]}: {exc.why}") from None
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise IntegrityError(f"chunk {digest[:16]}: cannot be read: {exc.strerror or exc}") from None
        raise IntegrityError(f"chunk {digest[:16]}: missing from the store")

    def listing(self) -> Iterator[tuple[str, str, int, float]]:
        """Every chunk as (space, digest, stored size, mtime); doomed ones under their digest."""
        try:
            with self.tree.at("chunks") as cfd:
                spaces = sorted(n for n in os.listdir(cfd) if SPACE.fullmatch(n))
        except FileNotFoundError:
            return
        for space in spaces:
            with self.tree.at("chunks", space) as sfd:
                fans = sorted(n for n in os.listdir(sfd) if re.fullmatch(r"[0-9a-f]{2}", n))
            for fan in fans:
                with self.tree.at("chunks", space, fan) as ffd:
                    for name in sorted(os.listdir(ffd)):
                        digest = name.removeprefix(DOOMED)
                        if not DIGEST.fullmatch(digest) or digest[:2] != fan:
                            continue
                        with contextlib.suppress(FileNotFoundError):
                            st = os.stat(name, dir_fd=ffd, follow_symlinks=False)
                            if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
                                yield space, digest, st.st_size, st.st_mtime

    def discard(self, space: str, digest: str) -> None:
        """Remove a chunk proven bad (its bytes do not match its name), so that the next
        checkpoint holding those bytes writes it again instead of sharing the damage."""
        with self.folder(space, digest) as fd:
            safefs.unlink(fd, digest)

    def doom(self, space: str, digest: str) -> bool:
        """Set a chunk aside for removal; False when it is not there."""
        with self.folder(space, digest) as fd:
            try:
                os.rename(digest, DOOMED + digest, src_dir_fd=fd, dst_dir_fd=fd)
            except FileNotFoundError:
                return False
        return True

    def spare(self, space: str, digest: str) -> None:
        """Put a doomed chunk back (a reference turned up)."""
        with self.folder(space, digest) as fd, contextlib.suppress(FileNotFoundError):
            os.rename(DOOMED + digest, digest, src_dir_fd=fd, dst_dir_fd=fd)

    def drop(self, space: str, digest: str) -> None:
        """Remove a doomed chunk for good."""
        with self.folder(space, digest) as fd:
            safefs.unlink(fd, DOOMED + digest)

    def remove_strays(self, older_than: float) -> int:
        """Remove temporary files of chunk writers that died (untouched since `older_than`)."""
        removed = 0
        for space, fan, name in self._temporaries():
            with self.tree.at("chunks", space, fan) as fd, contextlib.suppress(FileNotFoundError):
                if os.stat(name, dir_fd=fd, follow_symlinks=False).st_mtime < older_than:
                    os.unlink(name, dir_fd=fd)
                    removed += 1
        return removed

    def _temporaries(self) -> list[tuple[str, str, str]]:
        found = []
        try:
            with self.tree.at("chunks") as cfd:
                spaces = [n for n in os.listdir(cfd) if SPACE.fullmatch(n)]
        except FileNotFoundError:
            return []
        for space in spaces:
            with self.tree.at("chunks", space) as sfd:
                fans = [n for n in os.listdir(sfd) if re.fullmatch(r"[0-9a-f]{2}", n)]
            for fan in fans:
                with self.tree.at("chunks", space, fan) as ffd:
                    found += [(space, fan, n) for n in os.listdir(ffd) if n.startswith(".tmp-")]
        return found


class Journal:
    """The chunks a checkpoint being written uses, appended to its staging folder before each
    is looked for in the store, so that removal never takes one in use (see `chunkgc`)."""

    def __init__(self, staging_fd: int) -> None:
        # A new file, never appended to through a link or hard link planted in a shared store.
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        self._fd = os.open(REFS, flags, 0o600, dir_fd=staging_fd)

    def add(self, space: str, digest: str) -> None:
        os.write(self._fd, f"{space} {digest}\n".encode())

    def close(self) -> None:
        os.close(self._fd)
