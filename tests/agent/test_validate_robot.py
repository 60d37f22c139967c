"""The operator's side of validation on the robot: verdict arguments from the control API (property-tested, it
is outside input), the blind pair order, and the verdict hand-off between the control thread and the session."""

from __future__ import annotations

import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zk0.agent.control import Request, parse_request
from zk0.agent.rollout_guard import Estop
from zk0.agent.validate import ROLES, VALIDATION_SEED_BASE
from zk0.agent.validate_robot import CONTROL_COMMANDS, OperatorVerdicts, ValidationStatus, pair_order, verdict_args

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=8)


@given(st.dictionaries(st.text(max_size=10), JSON, max_size=4))
def test_verdict_arguments_are_exactly_success_or_fail(args):
    valid = set(args) == {"outcome"} and args["outcome"] in ("success", "fail")
    if valid:
        assert verdict_args(args) is (args["outcome"] == "success")
    else:
        with pytest.raises(ValueError, match="verdict"):
            verdict_args(args)


def test_the_control_api_checks_verdicts_before_the_session_sees_them():
    assert parse_request(b'{"command": "verdict", "args": {"outcome": "fail"}}', CONTROL_COMMANDS) == Request("verdict", False)
    for raw in (b'{"command": "verdict"}', b'{"command": "verdict", "args": {"outcome": "yes"}}'):
        with pytest.raises(ValueError, match="verdict"):
            parse_request(raw, CONTROL_COMMANDS)


def test_pair_order_is_reproducible_and_balanced():
    orders = [pair_order(VALIDATION_SEED_BASE + i) for i in range(200)]
    assert orders == [pair_order(VALIDATION_SEED_BASE + i) for i in range(200)]
    assert set(orders) == {ROLES, ROLES[::-1]}
    assert 80 <= orders.count(ROLES) <= 120  # a fair coin: the operator cannot learn which policy runs first


def test_a_verdict_goes_to_the_open_episode_once_and_ends_it():
    estop = Estop()
    verdicts = OperatorVerdicts(estop)
    handle = ValidationStatus(2, verdicts).control_handler(estop)
    with pytest.raises(ValueError, match="no validation episode"):
        handle(Request("verdict", True))
    verdicts.begin()
    assert not verdicts.episode_over()
    threading.Timer(0.2, verdicts.give, (True,)).start()
    success, after_s = verdicts.wait()  # blocks until the control thread's verdict
    assert success is True and 0.15 <= after_s < 2.0 and verdicts.episode_over()
    with pytest.raises(ValueError, match="no validation episode"):  # the episode is closed: a second one is refused
        handle(Request("verdict", False))
    verdicts.begin()
    handle(Request("verdict", False))
    with pytest.raises(ValueError, match="already"):
        handle(Request("verdict", True))
    assert verdicts.wait()[0] is False


def test_an_estop_ends_the_wait_for_a_verdict_and_leases_are_refused():
    estop = Estop()
    verdicts = OperatorVerdicts(estop)
    handle = ValidationStatus(2, verdicts).control_handler(estop)
    verdicts.begin()
    threading.Timer(0.2, handle, (Request("estop"),)).start()
    started = time.monotonic()
    assert verdicts.wait() is None and time.monotonic() - started < 1.0 and estop.source == "zk0ctl"
    from types import SimpleNamespace

    refusal = handle(Request("lease", SimpleNamespace(purpose="train", ttl_s=30, holder="n")))
    assert refusal["granted"] is False and "validation" in refusal["reason"]
