"""A process of a container (its init, or an exec) and how its exit is recorded."""

from __future__ import annotations

import asyncio
import dataclasses
import time

from hotrestart.container.state import EXEC_TRANSITIONS, TRANSITIONS, Action, State, StateMachine
from hotrestart.container.stdio import ProcessIO


@dataclasses.dataclass(frozen=True, slots=True)
class StdioPaths:
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class ExitInfo:
    pid: int
    status: int
    exited_at_ns: int


class Process:
    def __init__(
        self, container_id: str, exec_id: str, stdio: StdioPaths, io: ProcessIO, initial: State = State.CREATED
    ) -> None:
        self.container_id = container_id
        self.exec_id = exec_id
        self.stdio = stdio
        self.io = io
        self.sm = StateMachine(initial, EXEC_TRANSITIONS if exec_id else TRANSITIONS)
        self.pid = 0
        self.exit_status = 0
        self.exited_at_ns = 0
        self._exited = asyncio.Event()

    @property
    def id(self) -> str:
        return self.exec_id or self.container_id

    @property
    def state(self) -> State:
        return self.sm.state

    @property
    def exited(self) -> bool:
        return self._exited.is_set()

    def set_exited(self, status: int) -> None:
        if self._exited.is_set():
            return
        self.exit_status = status
        self.exited_at_ns = time.time_ns()
        self.sm.advance(Action.EXIT)
        self._exited.set()

    async def wait(self) -> ExitInfo:
        await self._exited.wait()
        return self.exit_info()

    def exit_info(self) -> ExitInfo:
        return ExitInfo(self.pid, self.exit_status, self.exited_at_ns)
