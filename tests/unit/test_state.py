from __future__ import annotations

import pytest

from hotrestart.container.state import EXEC_TRANSITIONS, TRANSITIONS, Action, State, StateMachine
from hotrestart.errors import Code, InvalidTransitionError, NotFoundError, status_for


def test_happy_path() -> None:
    sm = StateMachine()
    for action, expected in [
        (Action.START, State.RUNNING),
        (Action.PAUSE, State.PAUSED),
        (Action.RESUME, State.RUNNING),
        (Action.EXIT, State.STOPPED),
        (Action.DELETE, State.DELETED),
    ]:
        assert sm.advance(action) is expected


def test_created_from_checkpoint_starts_by_restoring() -> None:
    sm = StateMachine(State.CREATED_CHECKPOINT)
    with pytest.raises(InvalidTransitionError):
        sm.check(Action.PAUSE)
    assert sm.advance(Action.START) is State.RUNNING


@pytest.mark.parametrize(
    ("state", "action"),
    [
        (State.RUNNING, Action.START),
        (State.RUNNING, Action.DELETE),
        (State.PAUSED, Action.EXEC),
        (State.CREATED, Action.PAUSE),
        (State.STOPPED, Action.START),
        (State.STOPPED, Action.RESUME),
    ],
)
def test_illegal_calls_name_the_transition(state: State, action: Action) -> None:
    sm = StateMachine(state)
    with pytest.raises(InvalidTransitionError) as info:
        sm.check(action)
    assert state.value in str(info.value) and action.value in str(info.value)
    assert status_for(info.value)[0] == Code.FAILED_PRECONDITION
    assert sm.state is state  # a refused call changes nothing


def test_kill_after_exit_is_not_found_like_runc_v2() -> None:
    sm = StateMachine(State.STOPPED)
    with pytest.raises(NotFoundError, match="process already finished"):
        sm.check(Action.KILL)


def test_deleted_is_terminal() -> None:
    sm = StateMachine(State.DELETED)
    for action in Action:
        with pytest.raises(NotFoundError):
            sm.check(action)


def test_tables_cover_every_state() -> None:
    assert set(TRANSITIONS) == set(State)
    assert all(target in TRANSITIONS for moves in TRANSITIONS.values() for target in moves.values())
    assert all(target in EXEC_TRANSITIONS for moves in EXEC_TRANSITIONS.values() for target in moves.values())
