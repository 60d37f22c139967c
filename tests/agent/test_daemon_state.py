"""The agent's transition table: every (state, event) pair, with the design's outcome or refusal; and the holds
around it: a starting agent (its hardware check not passed yet) and a stopping one (SIGTERM) take no new job or
lease, and stopping revokes the lease held, which its holder's revocation watcher reads (zk0.agent.lease)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zk0.agent import lease
from zk0.agent.control import parse_request
from zk0.agent.daemon import sim_defaults
from zk0.agent.daemon_core import COMMANDS, AgentCore, AgentPaths
from zk0.agent.daemon_state import Event, Refused, State, next_state
from zk0.agent.idle import LeaseVerdict

S, I, R, T, O, V, F, E = (State.STARTING, State.IDLE, State.RECORDING, State.TRAINING, State.ROLLOUT,
                          State.VALIDATING, State.FAULT, State.ESTOPPED)
NA, NOT_YET = "does not apply", "the agent is starting"
# state -> {event: next state, or the words of the refusal}
TABLE: dict[State, dict[Event, State | str]] = {
    S: {Event.RECORD: NOT_YET, Event.ROLLOUT: NOT_YET, Event.VALIDATE: NOT_YET, Event.JOB_DONE: NA,
        Event.JOB_FAILED: NA, Event.LEASE_GRANTED: "no training lease while starting", Event.LEASE_ENDED: NA,
        Event.ESTOP: E, Event.CLEAR: "nothing to clear", Event.READY: I},
    I: {Event.RECORD: R, Event.ROLLOUT: O, Event.VALIDATE: V, Event.JOB_DONE: NA,
        Event.JOB_FAILED: NA, Event.LEASE_GRANTED: T, Event.LEASE_ENDED: NA,
        Event.ESTOP: E, Event.CLEAR: "nothing to clear", Event.READY: NA},
    R: {Event.RECORD: "recording in progress", Event.ROLLOUT: "recording in progress",
        Event.VALIDATE: "recording in progress", Event.JOB_DONE: I, Event.JOB_FAILED: F,
        Event.LEASE_GRANTED: "no training lease while recording", Event.LEASE_ENDED: NA,
        Event.ESTOP: E, Event.CLEAR: "nothing to clear", Event.READY: NA},
    T: {Event.RECORD: R, Event.ROLLOUT: O, Event.VALIDATE: V, Event.JOB_DONE: NA,
        Event.JOB_FAILED: NA, Event.LEASE_GRANTED: "no training lease while training",
        Event.LEASE_ENDED: I, Event.ESTOP: E, Event.CLEAR: "nothing to clear", Event.READY: NA},
    O: {Event.RECORD: "rollout in progress", Event.ROLLOUT: "rollout in progress", Event.VALIDATE: "rollout in progress",
        Event.JOB_DONE: I, Event.JOB_FAILED: F, Event.LEASE_GRANTED: "no training lease while rollout",
        Event.LEASE_ENDED: NA, Event.ESTOP: E, Event.CLEAR: "nothing to clear", Event.READY: NA},
    V: {Event.RECORD: "validating in progress", Event.ROLLOUT: "validating in progress",
        Event.VALIDATE: "validating in progress", Event.JOB_DONE: I, Event.JOB_FAILED: F,
        Event.LEASE_GRANTED: "no training lease while validating", Event.LEASE_ENDED: NA,
        Event.ESTOP: E, Event.CLEAR: "nothing to clear", Event.READY: NA},
    F: {Event.RECORD: "zk0ctl clear", Event.ROLLOUT: "zk0ctl clear", Event.VALIDATE: "zk0ctl clear",
        Event.JOB_DONE: NA, Event.JOB_FAILED: NA,
        Event.LEASE_GRANTED: "no training lease while fault", Event.LEASE_ENDED: NA, Event.ESTOP: E,
        Event.CLEAR: I, Event.READY: NA},
    E: {Event.RECORD: "zk0ctl clear", Event.ROLLOUT: "zk0ctl clear", Event.VALIDATE: "zk0ctl clear",
        Event.JOB_DONE: E, Event.JOB_FAILED: E, Event.LEASE_GRANTED: "no training lease while estopped",
        Event.LEASE_ENDED: NA, Event.ESTOP: E, Event.CLEAR: I, Event.READY: NA},
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


def test_a_starting_or_stopping_agent_takes_no_new_work_and_stopping_revokes_the_lease(tmp_path: Path,
                                                                                        monkeypatch) -> None:
    from zk0.agent.config import parse_config

    published: list[dict] = []
    core = AgentCore(parse_config(sim_defaults(tmp_path / "state")), AgentPaths(tmp_path / "state", tmp_path / "run"),
                     True, tmp_path / "policies", lambda kind, **fields: published.append({"type": kind, **fields}),
                     starting=True)
    # the idle-window rules have their own table test; here every window is open
    monkeypatch.setattr("zk0.agent.daemon_core.lease_decision", lambda *_: LeaseVerdict(True, "idle", 30.0))

    def ask(command: str, **args) -> dict:
        return core.handle(parse_request(json.dumps({"command": command, "args": args}).encode(), COMMANDS))

    want = {"purpose": "train", "ttl_s": 30, "holder": "node 1"}
    start = {"action": "start", "dataset": "demo", "task": "pick the red cube"}
    assert ask("status")["state"] == "starting" and ask("lease", **want)["granted"] is False
    for command, args in (("record", start), ("clear", {})):
        with pytest.raises(ValueError, match="the agent is starting"):
            ask(command, **args)
    core.not_ready("camera front: no frame; retrying in 5 s")
    assert ask("status")["reason"] == "camera front: no frame; retrying in 5 s"

    core.ready("robot and cameras answer")  # READY=1
    assert ask("status")["state"] == "idle" and published[-1]["previous"] == "starting"
    grant = ask("lease", **want)
    assert grant["granted"] and core.state is State.TRAINING
    assert core.begin_stopping() is None  # SIGTERM, no job running
    ended = next(e for e in published if e["type"] == "lease" and e["status"] == "ended")
    # what the holder's watcher makes of it: lost at once, so training stops at its next step boundary
    assert lease.revocation_reason(json.dumps(ended).encode(), grant["lease_id"]) == "revoked: the agent is stopping"
    assert core.state is State.IDLE
    assert ask("lease-renew", lease_id=grant["lease_id"], ttl_s=30)["granted"] is False
    assert ask("lease", **want)["reason"] == "the agent is stopping"
    for command, args in (("record", start), ("train", {"action": "now"}), ("clear", {})):
        with pytest.raises(ValueError, match="the agent is stopping"):
            ask(command, **args)
    assert ask("status")["unavailable"] == "stopping"
    assert ask("estop")["state"] == "estopped"  # an estop is never refused


def test_an_estop_while_starting_holds_after_the_hardware_answered(tmp_path: Path) -> None:
    from zk0.agent.config import parse_config

    core = AgentCore(parse_config(sim_defaults(tmp_path / "state")), AgentPaths(tmp_path / "state", tmp_path / "run"),
                     True, tmp_path / "policies", lambda *_, **__: None, starting=True)
    core.handle(parse_request(b'{"command": "estop"}', COMMANDS))
    core.ready("robot and cameras answer")
    assert core.state is State.ESTOPPED and core.reason == "estop from zk0ctl" and core.unavailable is None
