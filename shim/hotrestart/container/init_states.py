"""What Start, Kill and Delete do in each state of a container's init, one class per state.

The transition table (`state.py`) says which calls a state allows and where they lead;
these classes say what an allowed call does there, so that the container holds no
if/elif on its state. Each works through the container's own primitives.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import TYPE_CHECKING

from hotrestart.container.state import State
from hotrestart.errors import NotFoundError, RuntimeCommandError

if TYPE_CHECKING:
    from hotrestart.container.container import Container


class InitState:
    """Behaviour shared by most states; a state overrides what it does differently."""

    def __init__(self, c: Container) -> None:
        self.c = c

    async def start(self) -> None:
        raise AssertionError("the transition table refuses Start here")

    async def kill(self, sig: int, all_processes: bool) -> None:
        c = self.c
        if sig == signal.SIGKILL:
            c.checkpointing.interrupt()
        await c.cancel_stop()
        try:
            await c.runc.kill(c.id, sig, all_processes=all_processes)
        except RuntimeCommandError as exc:
            if c.init.exited or "not running" in exc.detail or "already finished" in exc.detail:
                raise NotFoundError("process already finished") from exc
            raise

    async def delete(self) -> None:
        c = self.c
        with contextlib.suppress(NotFoundError):
            await c.runc.delete(c.id)


class Created(InitState):
    async def start(self) -> None:
        await self.c.runc.start(self.c.id)

    async def delete(self) -> None:
        c = self.c
        with contextlib.suppress(NotFoundError):
            await c.runc.delete(c.id, force=True)
        if c.init.pid:
            # A created-but-never-started init was killed by `delete --force`; report it.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await c.init.wait()


class _NothingInRunc(InitState):
    """Created to restore: runc holds no container yet, so there is nothing to kill or delete."""

    async def kill(self, sig: int, all_processes: bool) -> None:
        raise NotFoundError("process already finished")

    async def delete(self) -> None:
        pass


class CreatedFromCheckpoint(_NothingInRunc):
    """Start restores the CRIU images containerd gave (Create with a checkpoint)."""

    async def start(self) -> None:
        await self.c.restore_from_images()


class CreatedToRestore(_NothingInRunc):
    """Start restores the hot-restart checkpoint planned at create, or starts cold."""

    async def start(self) -> None:
        await self.c.hot_restore()


class Running(InitState):
    async def kill(self, sig: int, all_processes: bool) -> None:
        if sig != signal.SIGKILL and self.c.checkpointing.hot:
            # A stop: checkpoint instead of delivering the signal (a second one is absorbed).
            self.c.stop_with_checkpoint(sig)
            return
        await super().kill(sig, all_processes)


BEHAVIOUR: dict[State, type[InitState]] = {
    State.CREATED: Created,
    State.CREATED_CHECKPOINT: CreatedFromCheckpoint,
    State.CREATED_RESTORE: CreatedToRestore,
    State.RUNNING: Running,
    State.PAUSED: InitState,
    State.STOPPED: InitState,
    State.DELETED: InitState,
}
