"""The agent's transition table: every (state, event) pair, with the design's outcome or refusal."""

from __future__ import annotations

import pytest

from zk0.agent.daemon_state import Event, Refused, State, next_state

I, R, T, O, V, F, E = (State.IDLE, State.RECORDING, State.TRAINING, State.ROLLOUT, State.VALIDATING, State.FAULT,
                       State.ESTOPPED)
# state -> {event: next state, or the words of the refusal}
TABLE: dict[State, dict[Event, State | str]] = {
    I: {Event.RECORD: R, Event.ROLLOUT: O, Event.VALIDATE: V, Event.JOB_DONE: "does not apply",
        Event.JOB_FAILED: "does not apply", Event.LEASE_GRANTED: T, Event.LEASE_ENDED: "does not apply",
        Event.ESTOP: E, Event.CLEAR: "nothing to clear"},
    R: {Event.RECORD: "recording in progress", Event.ROLLOUT: "recording in progress",
        Event.VALIDATE: "recording in progress", Event.JOB_DONE: I, Event.JOB_FAILED: F,
        Event.LEASE_GRANTED: "no training lease while recording", Event.LEASE_ENDED: "does not apply",
        Event.ESTOP: E, Event.CLEAR: "nothing to clear"},
    T: {Event.RECORD: R, Event.ROLLOUT: O, Event.VALIDATE: V, Event.JOB_DONE: "does not apply",
        Event.JOB_FAILED: "does not apply", Event.LEASE_GRANTED: "no training lease while training",
        Event.LEASE_ENDED: I, Event.ESTOP: E, Event.CLEAR: "nothing to clear"},
    O: {Event.RECORD: "rollout in progress", Event.ROLLOUT: "rollout in progress", Event.VALIDATE: "rollout in progress",
        Event.JOB_DONE: I, Event.JOB_FAILED: F, Event.LEASE_GRANTED: "no training lease while rollout",
        Event.LEASE_ENDED: "does not apply", Event.ESTOP: E, Event.CLEAR: "nothing to clear"},
    V: {Event.RECORD: "validating in progress", Event.ROLLOUT: "validating in progress",
        Event.VALIDATE: "validating in progress", Event.JOB_DONE: I, Event.JOB_FAILED: F,
        Event.LEASE_GRANTED: "no training lease while validating", Event.LEASE_ENDED: "does not apply",
        Event.ESTOP: E, Event.CLEAR: "nothing to clear"},
    F: {Event.RECORD: "zk0ctl clear", Event.ROLLOUT: "zk0ctl clear", Event.VALIDATE: "zk0ctl clear",
        Event.JOB_DONE: "does not apply", Event.JOB_FAILED: "does not apply",
        Event.LEASE_GRANTED: "no training lease while fault", Event.LEASE_ENDED: "does not apply", Event.ESTOP: E,
        Event.CLEAR: I},
    E: {Event.RECORD: "zk0ctl clear", Event.ROLLOUT: "zk0ctl clear", Event.VALIDATE: "zk0ctl clear",
        Event.JOB_DONE: E, Event.JOB_FAILED: E, Event.LEASE_GRANTED: "no training lease while estopped",
        Event.LEASE_ENDED: "does not apply", Event.ESTOP: E, Event.CLEAR: I},
}


def test_the_table_covers_every_state_and_event() -> None:
    assert set(TABLE) == set(State) and all(set(row) == set(Event) for row in TABLE.values())


@pytest.mark.parametrize(("state", "event", "expected"),
                         [(s, e, x) for s, row in TABLE.items() for e, x in row.items()])
def test_transition(state: State, event: Event, expected) -> None:
    if isinstance(expected, State):
        assert next_state(state, event) is expected
    else:
        with pytest.raises(Refused, match=expected):
            next_state(state, event)


def test_an_estop_is_cleared_only_once_its_job_has_stopped() -> None:
    with pytest.raises(Refused, match="still stopping"):
        next_state(E, Event.CLEAR, job_running=True)
    assert next_state(E, Event.CLEAR, job_running=False) is I
