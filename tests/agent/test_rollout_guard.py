"""The watchdog / estop transition table with the design's numbers (hold 200 ms, torque off 1 s, estop hold
0.5 s), and the estop trigger waking a sleeping loop, from another thread or a signal handler."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from zk0.agent.config import RolloutSettings
from zk0.agent.rollout_guard import Estop, GuardState, Mode, guard_step

TIMES = RolloutSettings(watchdog_hold_s=0.2, watchdog_torque_off_s=1.0, estop_hold_s=0.5)
RUN, HOLD, OFF = GuardState(Mode.RUN), GuardState(Mode.HOLD, "watchdog"), GuardState(Mode.TORQUE_OFF, "x")


@pytest.mark.parametrize(("state", "now", "last_action", "estop_at", "mode", "reason"), [
    (RUN, 10.0, 9.9, None, Mode.RUN, None),  # fresh action
    (RUN, 10.0, 9.81, None, Mode.RUN, None),  # 190 ms: still fine
    (RUN, 10.0, 9.75, None, Mode.HOLD, "watchdog: no action for 250 ms"),
    (RUN, 10.0, 9.5, None, Mode.HOLD, "watchdog: no action for 500 ms"),
    (HOLD, 10.0, 9.95, None, Mode.RUN, None),  # a fresh action ends a watchdog hold
    (HOLD, 10.0, 9.0, None, Mode.TORQUE_OFF, "watchdog: no action for 1000 ms"),  # counted from the last action
    (RUN, 10.0, 8.0, None, Mode.TORQUE_OFF, "watchdog: no action for 2000 ms"),  # a late tick skips the hold
    (OFF, 10.0, 9.99, None, Mode.TORQUE_OFF, "x"),  # absorbing: torque never comes back by itself
    (OFF, 10.0, 9.99, 9.0, Mode.TORQUE_OFF, "x"),
    (RUN, 10.0, 9.99, 10.0, Mode.HOLD, "estop"),  # estop: hold at once, fresh actions or not
    (HOLD, 10.0, 9.99, 9.6, Mode.HOLD, "estop"),
    (HOLD, 10.0, 9.99, 9.5, Mode.TORQUE_OFF, "estop"),  # estop_hold_s after the request
    (RUN, 10.0, 8.0, 9.9, Mode.HOLD, "estop"),  # an estop's hold is not cut short by the watchdog
])
def test_guard_transitions(state, now, last_action, estop_at, mode, reason) -> None:
    assert guard_step(state, now, last_action, estop_at, TIMES) == GuardState(mode, reason)


def test_estop_wakes_a_sleeping_loop_and_keeps_the_first_request() -> None:
    estop = Estop()
    threading.Timer(0.05, estop.request, args=("zk0ctl",)).start()
    started = time.perf_counter()
    estop.sleep(5.0)
    assert time.perf_counter() - started < 1.0
    first = estop.requested_at
    estop.request("SIGINT")
    assert (estop.requested_at, estop.source) == (first, "zk0ctl")
    started = time.perf_counter()
    estop.sleep(0.05)  # after a request, a plain sleep (the estop's own hold is timed by the loop)
    assert time.perf_counter() - started >= 0.05


def test_a_signal_handler_wakes_the_loop_it_interrupts() -> None:
    """The handler runs in the sleeping thread itself (as SIGINT/SIGTERM do in `zk0 rollout`); SIGUSR1 here, so
    pytest's own handlers stay untouched."""
    estop = Estop()
    previous = signal.signal(signal.SIGUSR1, lambda num, _: estop.request(signal.Signals(num).name))
    try:
        threading.Timer(0.05, os.kill, args=(os.getpid(), signal.SIGUSR1)).start()
        started = time.perf_counter()
        estop.sleep(5.0)
        assert time.perf_counter() - started < 1.0 and estop.source == "SIGUSR1"
    finally:
        signal.signal(signal.SIGUSR1, previous)
