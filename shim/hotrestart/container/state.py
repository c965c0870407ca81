"""The container (and exec process) life cycle as an explicit transition table.

Every call that depends on state asks the table first; a call the current state does not
allow fails with FailedPrecondition naming the state and the action, before any side effect.
`CREATED_CHECKPOINT` is a created container whose Start restores from the CRIU images
containerd gave; `CREATED_RESTORE` one whose Start restores the hot-restart checkpoint
planned at create (and starts cold if that fails). What each call does in each state is in
`init_states`.
"""

from __future__ import annotations

import enum

from hotrestart.errors import InvalidTransitionError, NotFoundError


class State(enum.Enum):
    CREATED = "created"
    CREATED_CHECKPOINT = "created from checkpoint"
    CREATED_RESTORE = "created to restore"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    DELETED = "deleted"


class Action(enum.Enum):
    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    KILL = "kill"
    EXEC = "exec"
    UPDATE = "update"
    CHECKPOINT = "checkpoint"
    STATS = "stats"
    EXIT = "exit"
    DELETE = "delete"
    PLAN_RESTORE = "plan a restore for"


S, A = State, Action

# state -> action -> next state. Absent pairs are illegal.
TRANSITIONS: dict[State, dict[Action, State]] = {
    S.CREATED: {
        A.PLAN_RESTORE: S.CREATED_RESTORE,
        A.START: S.RUNNING,
        A.KILL: S.CREATED,
        A.EXIT: S.STOPPED,
        A.DELETE: S.DELETED,
        A.UPDATE: S.CREATED,
        A.STATS: S.CREATED,
    },
    S.CREATED_CHECKPOINT: {A.START: S.RUNNING, A.EXIT: S.STOPPED, A.DELETE: S.DELETED},
    S.CREATED_RESTORE: {A.START: S.RUNNING, A.EXIT: S.STOPPED, A.DELETE: S.DELETED},
    S.RUNNING: {
        A.PAUSE: S.PAUSED,
        A.KILL: S.RUNNING,
        A.EXEC: S.RUNNING,
        A.UPDATE: S.RUNNING,
        A.CHECKPOINT: S.RUNNING,
        A.STATS: S.RUNNING,
        A.EXIT: S.STOPPED,
    },
    S.PAUSED: {
        A.RESUME: S.RUNNING,
        A.KILL: S.PAUSED,
        A.UPDATE: S.PAUSED,
        A.CHECKPOINT: S.PAUSED,
        A.STATS: S.PAUSED,
        A.EXIT: S.STOPPED,
    },
    S.STOPPED: {A.DELETE: S.DELETED, A.EXIT: S.STOPPED},
    S.DELETED: {},
}

# Exec processes have no pause or checkpoint of their own.
EXEC_TRANSITIONS: dict[State, dict[Action, State]] = {
    S.CREATED: {A.START: S.RUNNING, A.EXIT: S.STOPPED, A.DELETE: S.DELETED},
    S.RUNNING: {A.KILL: S.RUNNING, A.EXIT: S.STOPPED},
    S.STOPPED: {A.DELETE: S.DELETED, A.EXIT: S.STOPPED},
    S.DELETED: {},
}


class StateMachine:
    def __init__(self, initial: State = State.CREATED, table: dict[State, dict[Action, State]] = TRANSITIONS) -> None:
        self._state = initial
        self._table = table

    @property
    def state(self) -> State:
        return self._state

    def check(self, action: Action) -> State:
        """The state `action` leads to; raises if it is not allowed now."""
        target = self._table[self._state].get(action)
        if target is None:
            if self._state is State.DELETED:
                raise NotFoundError(f"cannot {action.value}: container is deleted")
            if self._state is State.STOPPED and action is Action.KILL:
                raise NotFoundError("process already finished")
            raise InvalidTransitionError(self._state.value, action.value)
        return target

    def advance(self, action: Action) -> State:
        self._state = self.check(action)
        return self._state
