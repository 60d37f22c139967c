"""The rollout's watchdog and emergency stop, as one pure transition function, and the estop trigger.

Three modes, decided every tick from the time of the last fresh policy action and the estop request:

- RUN: policy actions (inside the safety envelope) go to the arm.
- HOLD: the arm is commanded to the position it had when holding began; nothing from the policy reaches it.
- TORQUE_OFF: the motors are limp; the rollout ends. Absorbing: torque never comes back by itself, because an
  arm that went limp may have sagged, and re-energising it towards an old target would jerk it.

Watchdog (`RolloutSettings`): no fresh action for `watchdog_hold_s` -> HOLD; a fresh action before
`watchdog_torque_off_s` resumes RUN (a slow
inference is not a fault, and holding is harmless); none for `watchdog_torque_off_s` (counted from the last
action, not from the hold) -> TORQUE_OFF. Estop (`zk0ctl estop`, SIGINT, SIGTERM): HOLD at once and for good (latched:
fresh actions are ignored), TORQUE_OFF `estop_hold_s` after the request. Holding first, rather than cutting
torque at once, keeps a loaded arm from dropping onto whatever made the operator press stop.
"""

from __future__ import annotations

import os
import select
import time
import weakref
from dataclasses import dataclass
from enum import Enum

from zk0.agent.config import RolloutSettings


class Mode(str, Enum):
    RUN = "run"
    HOLD = "hold"
    TORQUE_OFF = "torque_off"


@dataclass(frozen=True)
class GuardState:
    mode: Mode = Mode.RUN
    reason: str | None = None  # why the arm is not under policy control (None in RUN)


def guard_step(state: GuardState, now: float, last_action_at: float, estop_at: float | None,
               times: RolloutSettings) -> GuardState:
    """The mode for this tick. `last_action_at`: when the freshest policy action arrived (the episode's
    start before the first); `estop_at`: when an estop was requested, None if never."""
    if state.mode is Mode.TORQUE_OFF:
        return state
    if estop_at is not None:
        if now - estop_at >= times.estop_hold_s:
            return GuardState(Mode.TORQUE_OFF, "estop")
        return GuardState(Mode.HOLD, "estop")
    silent = now - last_action_at
    if silent >= times.watchdog_torque_off_s:
        return GuardState(Mode.TORQUE_OFF, f"watchdog: no action for {silent * 1e3:.0f} ms")
    if silent >= times.watchdog_hold_s:
        return GuardState(Mode.HOLD, f"watchdog: no action for {silent * 1e3:.0f} ms")
    return GuardState(Mode.RUN)


class Estop:
    """An emergency-stop request, from any thread or a signal handler: records when it was first asked for and
    wakes the control loop if it is sleeping to its next deadline (so HOLD goes out at once, not a tick later).

    The wake-up is a byte on a pipe, not a `threading.Event`: a SIGINT/SIGTERM handler runs in the main thread
    between two bytecodes, possibly while that same thread is inside `Event.wait` holding the event's lock, and
    `Event.set` would then wait for that lock forever (the arm never held, torque never cut). `os.write` takes no
    lock, and a select interrupted by the signal is retried (PEP 475), finding the byte. `select` rather than
    `poll`/`epoll`: their timeouts are whole milliseconds, which put ~0.5 ms of jitter on every tick."""

    def __init__(self) -> None:
        self.requested_at: float | None = None  # time.perf_counter() of the first request
        self.source: str | None = None
        self._wake_r, self._wake_w = os.pipe()
        weakref.finalize(self, _close_all, self._wake_r, self._wake_w)

    def request(self, source: str) -> None:
        if self.requested_at is None:
            self.requested_at, self.source = time.perf_counter(), source
            os.write(self._wake_w, b"!")  # at most a byte or two (racing threads) ever: never blocks

    def sleep(self, seconds: float) -> None:
        """Sleep `seconds`, or less if an estop is requested meanwhile (time.sleep once one has been)."""
        if seconds <= 0:
            return
        if self.requested_at is not None:
            time.sleep(seconds)
        else:
            select.select([self._wake_r], [], [], seconds)


def _close_all(*fds: int) -> None:
    for fd in fds:
        os.close(fd)
