"""The agent's state machine: what the robot host is doing, as one pure transition table.

One state at a time, because one owner drives the arm: recording, rollout and validation each hold the robot;
training holds only the CPU (through a lease a Flower node asked for) and gives way to any of them. A job that
ends badly leaves FAULT, an emergency stop ESTOPPED; both keep every new job out until an operator clears
them (`zk0ctl clear`), so nothing starts moving an arm whose state nobody has looked at. The agent starts in
STARTING, where nothing starts either, until its robot and cameras answered (zk0.agent.readiness).

    STARTING ──ready──► IDLE      (an estop while starting holds: ESTOPPED until cleared)
    IDLE ──record/rollout/validate──► RECORDING | ROLLOUT | VALIDATING ──job done──► IDLE
      │ ▲                                 ▲            └──job failed──► FAULT ──clear──► IDLE
      │ └──lease ended── TRAINING ──record/rollout/validate (preempts: the lease is revoked)
      └──lease granted──► TRAINING
    any ──estop──► ESTOPPED ──clear (once no job runs)──► IDLE
"""

from __future__ import annotations

from enum import Enum


class State(str, Enum):
    STARTING = "starting"  # the robot and cameras have not answered the agent's check yet
    IDLE = "idle"
    RECORDING = "recording"
    TRAINING = "training"
    ROLLOUT = "rollout"
    VALIDATING = "validating"
    FAULT = "fault"
    ESTOPPED = "estopped"


class Event(str, Enum):
    RECORD = "record"  # a recording session starts
    ROLLOUT = "rollout"
    VALIDATE = "validate"
    JOB_DONE = "job-done"  # the session/rollout/validation ended as planned (or stopped by the operator)
    JOB_FAILED = "job-failed"  # it ended with an error (hardware, crash)
    LEASE_GRANTED = "lease-granted"
    LEASE_ENDED = "lease-ended"  # released, expired or revoked
    ESTOP = "estop"
    CLEAR = "clear"  # an operator acknowledges a fault or an estop
    READY = "ready"  # the robot and cameras answered: the agent takes work


JOB_STATES = {Event.RECORD: State.RECORDING, Event.ROLLOUT: State.ROLLOUT, Event.VALIDATE: State.VALIDATING}
ROBOT_STATES = frozenset(JOB_STATES.values())  # states in which a job drives the robot

TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.STARTING, Event.READY): State.IDLE,
    **{(State.IDLE, event): state for event, state in JOB_STATES.items()},
    **{(State.TRAINING, event): state for event, state in JOB_STATES.items()},  # preemption
    **{(state, Event.JOB_DONE): State.IDLE for state in ROBOT_STATES},
    **{(state, Event.JOB_FAILED): State.FAULT for state in ROBOT_STATES},
    (State.IDLE, Event.LEASE_GRANTED): State.TRAINING,
    (State.TRAINING, Event.LEASE_ENDED): State.IDLE,
    **{(state, Event.ESTOP): State.ESTOPPED for state in State},
    # the estopped job winds down (the rollout holds, then cuts torque); the state waits for the operator
    (State.ESTOPPED, Event.JOB_DONE): State.ESTOPPED,
    (State.ESTOPPED, Event.JOB_FAILED): State.ESTOPPED,
    (State.FAULT, Event.CLEAR): State.IDLE,
    (State.ESTOPPED, Event.CLEAR): State.IDLE,
}


class Refused(ValueError):
    """The event does not apply in this state; the message says why, for the operator."""


def next_state(state: State, event: Event, job_running: bool = False) -> State:
    """The state after `event`, or Refused. `job_running`: a job process still runs (an estopped rollout that
    has not cut torque yet), which keeps an estop from being cleared."""
    if event is Event.CLEAR and job_running:
        raise Refused(f"cannot clear while the {state.value} job is still stopping; try again in a moment")
    target = TRANSITIONS.get((state, event))
    if target is None:
        raise Refused(_why(state, event))
    return target


def _why(state: State, event: Event) -> str:
    if event in JOB_STATES:
        if state is State.STARTING:
            return f"cannot start {event.value}: the agent is starting (checking its robot and cameras)"
        if state in (State.FAULT, State.ESTOPPED):
            return f"cannot start {event.value}: the agent is {state.value}; `zk0ctl clear` after checking the robot"
        return f"cannot start {event.value}: {state.value} in progress"
    if event is Event.LEASE_GRANTED:
        return f"no training lease while {state.value}"
    if event is Event.CLEAR:
        return f"nothing to clear: the agent is {state.value}"
    return f"{event.value} does not apply while {state.value}"
