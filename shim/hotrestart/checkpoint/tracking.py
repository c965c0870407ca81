"""One container's chain of dumps under memory tracking: each dumps only what changed since the last.

Where the kernel tracks soft-dirty pages, every dump is taken with CRIU's memory tracking:
CRIU clears the tracking once the dump has read the memory, and a later dump given that
one as its parent writes only the pages written to since, marking the rest as in the
parent. A parent here is what CRIU reads of it (its inventory, with the time of the dump,
and its pagemaps, already made whole: no page in them is in a parent of theirs), kept in a
small folder, and the published checkpoint that holds its pages, from which the child is
made whole before it is stored (`flatten`). Each dump gets its own copy of that folder in
its work area, so that nothing the container's end removes is still needed by a publish.

A parent serves one dump only: whatever becomes of that dump, it has cleared the tracking,
so the pages written to before it are no longer told apart. It becomes the next parent
only once its checkpoint is published and if no dump began after it; any other outcome
leaves no parent, and the next dump reads all memory again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import shutil

from hotrestart.store.entry import Entry

log = logging.getLogger(__name__)

_KEPT = re.compile(r"inventory\.img|pagemap-(?:shmem-)?[0-9]{1,20}\.img")
PARENT = "parent-maps"  # in a dump's work folder: its parent's maps, or nothing
PARENT_LINK = "parent"  # what CRIU names its link to the parent in the images folder
# A parent whose pagemaps are larger than this is not used: the child's, made whole from
# it, could outgrow what `flatten` reads (millions of scattered runs).
MAX_PARENT_MAPS = 16 << 20


@dataclasses.dataclass(frozen=True, slots=True)
class Parent:
    maps: str  # the folder CRIU is given as the parent: inventory and whole pagemaps
    entry: Entry  # the published checkpoint holding its pages


@dataclasses.dataclass(frozen=True, slots=True)
class Link:
    """What one dump of the chain was given: its place in the chain, the folder it hands
    CRIU as the parent (empty when it has none: tracking is on either way), and its parent."""

    generation: int
    folder: str
    parent: Parent | None

    def parent_path(self, images: str) -> str:
        """`runc checkpoint --parent-path`: relative to the images folder, as runc requires."""
        return os.path.relpath(self.folder, images)

    def without_parent(self) -> Link:
        """This dump, taken whole after all (its parent's pages could not be secured)."""
        if self.parent is not None:
            for name in os.listdir(self.folder):
                os.unlink(os.path.join(self.folder, name))
        return Link(self.generation, self.folder, None)


class Tracking:
    """The chain of one container's dumps; `folder` is this container's own (removed by
    `close`, or with the work folders of a shim that is gone)."""

    def __init__(self, folder: str) -> None:
        self._folder = folder
        self._generation = 0
        self._parent: Parent | None = None
        self._closed = False

    def has_parent(self) -> bool:
        return self._parent is not None

    def begin(self, work: str, incremental: bool = True) -> Link:
        """A dump into the work folder `work` begins: it gets a copy of the parent, if there
        is one and it is to be `incremental`, and ends the chain before it either way."""
        self._generation += 1
        parent, self._parent = self._parent, None
        folder = os.path.join(work, PARENT)
        os.mkdir(folder, 0o700)
        if parent is None or not incremental:
            return Link(self._generation, folder, None)
        try:
            _copy_maps(parent.maps, folder)
        except OSError as exc:
            log.warning("memory tracking: this dump reads all memory (the parent could not be read: %s)", exc)
            return Link(self._generation, folder, None).without_parent()
        return Link(self._generation, folder, Parent(folder, parent.entry))

    def published(self, link: Link, images: str, entry: Entry) -> None:
        """The dump of `link`, its images made whole, is published as `entry`: it is the next
        dump's parent, unless another dump began since."""
        if link.generation != self._generation or self._closed:
            return
        maps = os.path.join(self._folder, str(link.generation))
        try:
            os.makedirs(self._folder, mode=0o700, exist_ok=True)
            os.mkdir(maps, 0o700)
            if _copy_maps(images, maps) > MAX_PARENT_MAPS:
                raise OSError(f"pagemaps larger than {MAX_PARENT_MAPS} bytes")
        except OSError as exc:
            log.warning("memory tracking: the next dump reads all memory (not kept as a parent: %s)", exc)
            shutil.rmtree(maps, ignore_errors=True)
            return
        self._drop_older(keep=str(link.generation))
        self._parent = Parent(maps, entry)

    def close(self) -> None:
        self._closed = True
        self._parent = None
        shutil.rmtree(self._folder, ignore_errors=True)

    def _drop_older(self, keep: str) -> None:
        with contextlib.suppress(OSError):
            for name in os.listdir(self._folder):
                if name != keep:
                    shutil.rmtree(os.path.join(self._folder, name), ignore_errors=True)


def _copy_maps(src: str, dst: str) -> int:
    """Copy the inventory and pagemaps of the images folder `src` into `dst`; their size."""
    size = 0
    for name in os.listdir(src):
        if _KEPT.fullmatch(name) and not os.path.islink(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name), follow_symlinks=False)
            size += os.path.getsize(os.path.join(dst, name))
    return size
