"""The operator's takeover verbs against lerobot's DAgger phases: each verb is valid in exactly one phase, and
what it asks for is the lerobot event that leads where the verb says."""

from __future__ import annotations

import pytest
from lerobot.rollout.strategies.dagger import DAggerEvents, DAggerPhase

from zk0.agent.dagger import VERBS, Takeover, dagger_event

AUTONOMOUS, PAUSED, CORRECTING = DAggerPhase.AUTONOMOUS, DAggerPhase.PAUSED, DAggerPhase.CORRECTING

# (phase, verb) -> the phase it leads to, or the refusal's words
TABLE = [
    (AUTONOMOUS, "pause", PAUSED),
    (AUTONOMOUS, "resume", "cannot resume while autonomous"),
    (AUTONOMOUS, "correct", "cannot correct while autonomous"),
    (AUTONOMOUS, "release", "cannot release while autonomous"),
    (PAUSED, "pause", "cannot pause while paused"),
    (PAUSED, "resume", AUTONOMOUS),
    (PAUSED, "correct", CORRECTING),
    (PAUSED, "release", "cannot release while paused"),
    (CORRECTING, "pause", "cannot pause while correcting"),
    (CORRECTING, "resume", "cannot resume while correcting"),
    (CORRECTING, "correct", "cannot correct while correcting"),
    (CORRECTING, "release", PAUSED),
]


def events_in(phase: DAggerPhase) -> DAggerEvents:
    events = DAggerEvents()
    events.phase = phase
    return events


@pytest.mark.parametrize(("phase", "verb", "expected"), TABLE)
def test_takeover_table(phase: DAggerPhase, verb: str, expected) -> None:
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected):
            dagger_event(phase, verb, has_leader=True)
        return
    events = events_in(phase)
    events.request_transition(dagger_event(phase, verb, has_leader=True))
    assert events.consume_transition() == (phase, expected)  # lerobot's own table agrees with zk0's verbs


def test_every_verb_is_in_the_table() -> None:
    assert {verb for _, verb, _ in TABLE} == set(VERBS)


def test_correcting_needs_the_leader_arm_and_unknown_verbs_are_refused() -> None:
    with pytest.raises(ValueError, match="--dagger"):
        dagger_event(PAUSED, "correct", has_leader=False)
    assert dagger_event(AUTONOMOUS, "pause", has_leader=False) == "pause_resume"  # pausing needs no leader
    with pytest.raises(ValueError, match="unknown takeover verb"):
        dagger_event(AUTONOMOUS, "takeover", has_leader=True)


def test_requests_apply_at_the_loops_call_and_a_new_episode_starts_autonomous() -> None:
    seen: list[tuple[DAggerPhase, DAggerPhase]] = []
    takeover = Takeover(on_phase=lambda old, new: seen.append((old, new)))
    assert takeover.request("pause") is AUTONOMOUS  # asked for, not applied yet
    assert takeover.apply_requested() == (AUTONOMOUS, PAUSED) and takeover.phase is PAUSED
    assert takeover.apply_requested() is None
    with pytest.raises(ValueError, match="--dagger"):
        takeover.request("correct")
    takeover.reset()
    assert takeover.phase is AUTONOMOUS and seen == [(AUTONOMOUS, PAUSED), (PAUSED, AUTONOMOUS)]
