"""One container's chain of dumps under memory tracking: each dumps only what changed since the last.

Where the kernel tracks soft-dirty pages, every dump is taken with CRIU's memory tracking:
CRIU clears the tracking once the dump has read the memory, and a later dump given that
one as its parent writes only the pages written to since, marking the rest as in the
parent. A parent here is what CRIU reads of it (its inventory, with the time of the dump,
and its pagemaps, already made whole: no page in them is in a parent of theirs) kept in a
small folder, and the published checkpoint that holds its pages, from which the child is
made whole before it is stored (`flatten`).

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
NO_PARENT = "no-parent"  # an empty folder: CRIU then dumps everything, with tracking on
PARENT_LINK = "parent"  # what CRIU names its link to the parent in the images folder


@dataclasses.dataclass(frozen=True, slots=True)
class Parent:
    maps: str  # the folder CRIU is given as the parent: inventory and whole pagemaps
    entry: Entry  # the published checkpoint holding its pages


@dataclasses.dataclass(frozen=True, slots=True)
class Link:
    """What one dump of the chain was given: its place in the chain and its parent, if any."""

    generation: int
    parent: Parent | None


class Tracking:
    """The chain of one container's dumps; `folder` is this container's own (removed by
    `close`, or with the work folders of a shim that is gone)."""

    def __init__(self, folder: str) -> None:
        self._folder = folder
        self._generation = 0
        self._parent: Parent | None = None
        self._closed = False

    def begin(self, incremental: bool = True) -> Link:
        """A dump begins: it gets the parent, if there is one and it is to be `incremental`,
        and ends the chain before it either way."""
        self._generation += 1
        parent, self._parent = self._parent, None
        return Link(self._generation, parent if incremental else None)

    def parent_path(self, link: Link, images: str) -> str:
        """The parent folder for `runc checkpoint --parent-path` (relative to `images`, as
        runc requires): the parent's, or an empty folder, so that tracking is on either way."""
        if link.parent is not None:
            return os.path.relpath(link.parent.maps, images)
        empty = os.path.join(os.path.dirname(images), NO_PARENT)
        os.makedirs(empty, mode=0o700, exist_ok=True)
        return os.path.relpath(empty, images)

    def published(self, link: Link, images: str, entry: Entry) -> None:
        """The dump of `link`, its images made whole, is published as `entry`: it is the next
        dump's parent, unless another dump began since."""
        if link.generation != self._generation or self._closed:
            return
        maps = os.path.join(self._folder, str(link.generation))
        try:
            os.makedirs(self._folder, mode=0o700, exist_ok=True)
            os.mkdir(maps, 0o700)
            for name in os.listdir(images):
                if _KEPT.fullmatch(name):
                    shutil.copyfile(os.path.join(images, name), os.path.join(maps, name), follow_symlinks=False)
        except OSError as exc:
            log.warning("memory tracking: the next dump reads all memory (could not keep the parent: %s)", exc)
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
