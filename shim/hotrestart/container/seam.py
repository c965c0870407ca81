"""The one seam between a container and checkpointing.

The container runs runc, processes, stdio and states; everything about checkpoints sits
behind `Checkpointing`, which the container asks and which never calls back. Two
implementations live in `hotrestart.checkpoint`: plain containers (runc-v2's behaviour:
`runc checkpoint` on request, nothing else) and hot restart (checkpoint on stop, restore on
create, periodic and API checkpoints kept in the store).

What the implementation knows of its container is `View`, plain values the container keeps
current (the init's pid, whether it is paused), never the container itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from hotrestart.errors import ArchiveRestoreError, FailedPreconditionError
from hotrestart.runtime import mounts
from hotrestart.runtime.runc import Runc


@dataclasses.dataclass
class View:
    """What checkpointing may know of one container; the container updates `pid` and `paused`."""

    id: str
    bundle: str
    spec: Mapping[str, Any]
    runc: Runc
    rootfs: tuple[mounts.Mount, ...]
    terminal: bool
    pid: int = 0
    paused: bool = False
    running: bool = False  # started, not paused, not exited

    @property
    def upperdir(self) -> str:
        """The overlay's writable layer: the container's own changes to its image."""
        for m in self.rootfs:
            if m.type == "overlay":
                for option in m.options:
                    if option.startswith("upperdir="):
                        return option.split("=", 1)[1]
        return ""


@dataclasses.dataclass(frozen=True, slots=True)
class CheckpointConfig:
    """A Task.Checkpoint request, decoded."""

    path: str
    exit: bool = False
    open_tcp: bool = False
    external_unix_sockets: bool = False
    terminal: bool = False
    file_locks: bool = False
    empty_namespaces: tuple[str, ...] = ()
    cgroups_mode: str = ""
    work_path: str = ""
    options_given: bool = False  # containerd 2.x sends none to a runtime not named runc: leave running


@dataclasses.dataclass(frozen=True, slots=True)
class RestorePlan:
    """The outcome of looking for a checkpoint at create: restore it, or start cold with a note
    for the container's output ("" when there is nothing to say)."""

    restore: bool
    note: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class RestoreImages:
    """A checkpoint made ready for `runc restore`: CRIU's images and work folder, and whether
    its TCP connections come back (else CRIU closes them)."""

    image_path: str
    work_path: str
    keep_tcp: bool
    note: str  # for the container's output, ahead of anything the process writes
    lazy: bool = False  # `runc restore --lazy-pages`: memory from the daemon in work_path


class Checkpointing(Protocol):
    """What a container asks of checkpointing, in the order of its life."""

    @property
    def hot(self) -> bool:
        """Hot restart applies to this container (stops checkpoint, creates restore)."""
        ...

    async def plan_restore(self) -> RestorePlan:
        """At create: is there a checkpoint to restore from?"""
        ...

    async def admit_images(self, path: str) -> str:
        """At create with CRIU images given by containerd (a CRI checkpoint archive): check
        them as the node allows and return the folder to restore from. Raises when refused."""
        ...

    async def prepare_restore(self) -> RestoreImages:
        """At start, after a plan to restore: claim, verify and unpack the checkpoint and
        replay its files. Raises on failure (the checkpoint is then quarantined)."""
        ...

    async def finish_restore(self) -> None:
        """`runc restore` succeeded; finish what it cannot do (GPU state). Raises on failure."""
        ...

    def abandon_restore(self, exc: BaseException) -> str:
        """The restore failed (or was cancelled) after `prepare_restore`: quarantine or release
        the checkpoint; returns the note for the cold start's output."""
        ...

    def started(self) -> None:
        """The init runs (started or restored)."""
        ...

    async def checkpoint_for_stop(self, sig: int) -> bool:
        """Checkpoint instead of delivering a stop signal: True when the processes are gone
        and their checkpoint is kept; False when the caller must deliver `sig`."""
        ...

    async def checkpoint(self, cfg: CheckpointConfig) -> None:
        """Task.Checkpoint: CRIU images into `cfg.path`."""
        ...

    def exclusive(self) -> AbstractAsyncContextManager[None]:
        """Held around pause and resume: no dump may run meanwhile (the freezer is CRIU's)."""
        ...

    def interrupt(self) -> None:
        """A SIGKILL: nothing scheduled may hold it up."""
        ...

    def exited(self, status: int, *, stop_requested: bool) -> None:
        """The init has exited with `status` (a stop's checkpoint, if any, has settled)."""
        ...

    def closed(self) -> None:
        """The container is deleted."""
        ...


class NoCheckpoints:
    """`Checkpointing` for a container that has none: stops signal, creates start cold."""

    def __init__(self, view: View) -> None:
        self.view = view

    @property
    def hot(self) -> bool:
        return False

    async def plan_restore(self) -> RestorePlan:
        return RestorePlan(False)

    async def admit_images(self, path: str) -> str:
        raise ArchiveRestoreError(f"container {self.view.id}: restoring from checkpoint images is not configured")

    async def prepare_restore(self) -> RestoreImages:
        raise FailedPreconditionError(f"container {self.view.id}: no restore was planned")

    async def finish_restore(self) -> None:
        pass

    def abandon_restore(self, exc: BaseException) -> str:
        return str(exc)

    def started(self) -> None:
        pass

    async def checkpoint_for_stop(self, sig: int) -> bool:
        return False

    async def checkpoint(self, cfg: CheckpointConfig) -> None:
        raise NotImplementedError("checkpoints are not configured for this container")

    def exclusive(self) -> AbstractAsyncContextManager[None]:
        return contextlib.nullcontext()

    def interrupt(self) -> None:
        pass

    def exited(self, status: int, *, stop_requested: bool) -> None:
        pass

    def closed(self) -> None:
        pass
