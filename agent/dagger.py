"""DAgger takeover during a rollout: the operator pauses the policy and corrects it with the leader arm.

The phases and their transitions are lerobot's (`lerobot.rollout.strategies.dagger`: `DAggerEvents`,
`DAggerPhase`): AUTONOMOUS (the policy drives) -> PAUSED (the follower holds its last goal) -> CORRECTING (the
leader's position drives the follower) -> PAUSED -> AUTONOMOUS. lerobot toggles them from a keyboard or a
pedal at the robot; a zk0 host is headless, so the operator sends four verbs through the control API
(`zk0ctl pause|correct|release|resume`), each valid in one phase, and the rollout loop applies a request at
its next tick, so a phase never changes in the middle of a tick.

The handover follows lerobot's: with an actuated leader (SO-100/101: it has torque), PAUSED drives the leader
to the follower's goal so the operator's hand meets the arm where it is, and its torque goes off for
CORRECTING. zk0 moves it tick by tick through a safety envelope of its own (the follower's step and velocity
bounds on the leader's calibrated limits) instead of lerobot's blocking 2 s interpolation, which would stop the
control loop. A leader without torque is not driven; the follower then travels to the leader's pose at the
envelope's step bound when the correction starts. Every follower target of PAUSED and CORRECTING still passes
the follower's envelope, and those frames carry the `intervention` flag.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # lerobot is imported where the phases are used: the agent daemon reads VERBS without it
    from lerobot.rollout.strategies.dagger import DAggerPhase
    from lerobot.teleoperators import Teleoperator

    from zk0.hw.safety import SafetyEnvelope

# verb -> (the value of the lerobot DAggerPhase it is valid in, lerobot's DAgger event)
VERBS: dict[str, tuple[str, str]] = {
    "pause": ("autonomous", "pause_resume"),
    "resume": ("paused", "pause_resume"),
    "correct": ("paused", "correction"),
    "release": ("correcting", "correction"),
}
_NEXT_STEP = {"autonomous": "pause", "paused": "correct or resume", "correcting": "release"}

PhaseHook = Callable[["DAggerPhase", "DAggerPhase"], object]


def dagger_event(phase: DAggerPhase, verb: str, has_leader: bool) -> str:
    """lerobot's event for the operator's `verb` in `phase`, or ValueError saying why it does not apply."""
    if verb not in VERBS:
        raise ValueError(f"unknown takeover verb {verb!r} (known: {', '.join(VERBS)})")
    valid_in, event = VERBS[verb]
    if verb == "correct" and not has_leader:
        raise ValueError("correct needs the leader arm: start the rollout with --dagger")
    if phase.value != valid_in:
        raise ValueError(f"cannot {verb} while {phase.value}; now: {_NEXT_STEP[phase.value]}")
    return event


class Takeover:
    """The operator's side of a rollout: requests from the control thread, applied by the loop at a tick boundary,
    and the leader arm (None: the operator can pause and resume, not correct)."""

    def __init__(self, leader: Teleoperator | None = None, leader_envelope: SafetyEnvelope | None = None,
                 keys: Sequence[str] = (), on_phase: PhaseHook | None = None) -> None:
        from lerobot.common.control_utils import teleop_supports_feedback
        from lerobot.rollout.strategies.dagger import DAggerEvents

        if leader is not None and leader_envelope is None:
            raise ValueError("a leader arm needs its envelope: the handover drives it")
        self.leader = leader
        self._envelope = leader_envelope
        self._keys = list(keys)
        self._on_phase = on_phase
        self._actuated = leader is not None and teleop_supports_feedback(leader)
        self._events = DAggerEvents()

    @property
    def phase(self) -> DAggerPhase:
        return self._events.phase

    def request(self, verb: str) -> DAggerPhase:
        """Ask for the phase change `verb` names (from any thread); ValueError when it does not apply now."""
        self._events.request_transition(dagger_event(self._events.phase, verb, self.leader is not None))
        return self._events.phase

    def apply_requested(self) -> tuple[DAggerPhase, DAggerPhase] | None:
        """The loop's call at the start of a tick: apply a pending request; (old, new) when the phase changed."""
        transition = self._events.consume_transition()
        if transition is not None:
            self._hand_over(*transition)
        return transition

    def reset(self) -> None:
        """A new episode starts autonomous: undo the handover of whatever phase the last one ended in."""
        phase = self._events.phase
        self._events.reset()
        if phase is not self._events.phase:
            self._hand_over(phase, self._events.phase)

    def _hand_over(self, old: DAggerPhase, new: DAggerPhase) -> None:
        if self._actuated:
            if new.value == "paused":
                if old.value == "autonomous":
                    self._envelope.reset()
                self.leader.enable_torque()  # held where the operator let go, or driven to the follower
            else:
                self.leader.disable_torque()  # free for the operator's hand (CORRECTING) or idle (AUTONOMOUS)
        if self._on_phase is not None:
            self._on_phase(old, new)

    def leader_position(self) -> np.ndarray:
        """The leader's joints in the follower's action order (one bus read)."""
        action = self.leader.get_action()
        return np.array([action[k] for k in self._keys], dtype=np.float64)

    def meet(self, goal: np.ndarray) -> None:
        """One tick of the PAUSED handover: move an actuated leader a bounded step towards the follower's goal."""
        if not self._actuated:
            return
        command = self._envelope.propose(goal, self.leader_position())
        self.leader.send_feedback(dict(zip(self._keys, command.target.tolist(), strict=True)))
        self._envelope.sent(command)
