"""Every scheduler rule, with the design's numbers."""

import json
import math

import pytest

from zk0.server.schedule import (
    ScheduleConfig,
    ScheduleState,
    client_mu,
    cosine_warm_restart_lr,
    global_mu,
    is_improvement,
    is_plateau,
    is_spike,
    schedule_round,
)

CFG = ScheduleConfig(base_lr=1e-4, t0=15, t_mult=2, eta_min=5e-7, max_lr=2e-4)


@pytest.mark.parametrize(
    ("server_round", "expected"),
    [
        (1, 1e-4),  # cycle 1 starts at the base LR
        (8, 5e-7 + (1e-4 - 5e-7) * (1 + math.cos(math.pi * 7 / 15)) / 2),
        (15, 5e-7 + (1e-4 - 5e-7) * (1 + math.cos(math.pi * 14 / 15)) / 2),
        (16, 1e-4),  # warm restart after T0 = 15 rounds
        (31, 5e-7 + (1e-4 - 5e-7) * (1 + math.cos(math.pi * 15 / 30)) / 2),  # mid cycle 2 (30 rounds)
        (46, 1e-4),  # second restart after 15 + 30 rounds
        (47, 5e-7 + (1e-4 - 5e-7) * (1 + math.cos(math.pi * 1 / 60)) / 2),  # cycle 3 is 60 rounds
    ],
)
def test_cosine_warm_restarts(server_round, expected):
    assert cosine_warm_restart_lr(server_round, CFG) == pytest.approx(expected, rel=1e-12)


def test_cosine_stays_above_eta_min():
    lrs = [cosine_warm_restart_lr(r, CFG) for r in range(1, 200)]
    assert min(lrs) >= 5e-7 and max(lrs) == pytest.approx(1e-4)


@pytest.mark.parametrize(
    ("losses", "plateau"),
    [
        ([1.0, 0.999, 0.998, 0.997, 0.995], True),  # 0.5 % better over 5 rounds
        ([1.0, 0.99, 0.98, 0.97, 0.95], False),  # 5 % better
        ([1.0, 0.995, 0.995, 0.995, 0.989], False),  # 1.1 % better
        ([1.0, 1.0, 1.0, 1.0], False),  # fewer than 5 rounds: no verdict
        ([2.0, 1.0, 1.0, 1.0, 1.0, 1.0], True),  # only the last 5 count
    ],
)
def test_plateau_window(losses, plateau):
    assert is_plateau(losses, CFG) is plateau


@pytest.mark.parametrize(
    ("losses", "spike"),
    [
        ([1.0, 1.2, 1.6], True),  # +0.6 over 3 rounds
        ([1.0, 1.2, 1.5], False),  # +0.5 is not more than 0.5
        ([0.5, 1.0, 1.3, 1.4], False),  # only the last 3 count: +0.4
        ([1.0, 1.9], False),  # fewer than 3 rounds
    ],
)
def test_spike_rule(losses, spike):
    assert is_spike(losses, CFG) is spike


def test_plateau_raises_lr_by_15_percent():
    decision = schedule_round(16, [1.0, 1.0, 1.0, 1.0, 1.0], ScheduleState(), CFG)
    assert decision.reason == "plateau"
    assert decision.lr == pytest.approx(1.15e-4)
    assert decision.state.lr_scale == pytest.approx(1.15)


def test_plateau_boost_is_capped_at_2e_4():
    decision = schedule_round(16, [1.0] * 5, ScheduleState(lr_scale=1.9), CFG)
    assert decision.lr == pytest.approx(2e-4)
    assert decision.state.lr_scale == pytest.approx(2.0)


def test_spike_holds_and_damps():
    losses = [1.0, 1.0, 1.0, 1.0, 1.6]  # also flat enough for the plateau rule: spike wins
    decision = schedule_round(16, losses, ScheduleState(lr_scale=1.15), CFG)
    assert decision.reason == "spike"
    assert decision.lr == pytest.approx(1e-4 * 1.15 * 0.5)


def test_no_rule_follows_cosine():
    decision = schedule_round(8, [2.0, 1.5, 1.0], ScheduleState(), CFG)
    assert decision.reason == "cosine"
    assert decision.lr == pytest.approx(cosine_warm_restart_lr(8, CFG))


@pytest.mark.parametrize(
    ("server_round", "expected"),
    [(1, 0.01), (2, 0.0098), (3, 0.01 * 0.98**2), (100, 0.01 * 0.98**99), (116, 0.001), (500, 0.001)],
)
def test_mu_decays_2_percent_per_round_to_floor(server_round, expected):
    cfg = ScheduleConfig(base_mu=0.01, mu_decay=0.98, mu_min=0.001)
    assert global_mu(server_round, cfg) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("mu", "loss_std", "expected"),
    [(0.005, 1.3, 0.02), (0.005, 1.2, 0.005), (0.005, None, 0.005), (0.03, 2.0, 0.03)],
)
def test_unstable_client_mu(mu, loss_std, expected):
    assert client_mu(mu, loss_std, CFG) == pytest.approx(expected)


@pytest.mark.parametrize("bad", [{"t0": 0}, {"eta_min": 1.0}, {"max_lr": 1e-5}, {"mu_decay": 0.0}])
def test_invalid_config_names_the_field(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        ScheduleConfig(**bad)


# Loss after rounds 1..29 (the 30 decisions see the losses before them): improving, plateau (rounds 4-12),
# improving (13-17), a long plateau (17-26), a rise and a spike (27-28), then a slightly lower loss.
TRACE = [2.0, 1.8, 1.6, 1.4, *[1.4] * 8, 1.2, 1.0, 0.9, 0.85, *[0.8] * 10, 1.0, 1.4, 1.3]


def _run_trace(losses):
    state, decisions = ScheduleState(), []
    for server_round in range(1, len(losses) + 2):
        decision = schedule_round(server_round, losses[: server_round - 1], state, CFG)
        decisions.append(decision)
        state = decision.state
    return decisions


def test_plateau_boost_fires_once_per_window_and_decays_on_improvement():
    assert len(TRACE) == 29
    decisions = _run_trace(TRACE)
    reasons = {r: d.reason for r, d in enumerate(decisions, start=1)}
    scales = {r: d.state.lr_scale for r, d in enumerate(decisions, start=1)}
    assert [r for r, why in reasons.items() if why == "plateau"] == [9, 22, 27]
    assert [r for r, why in reasons.items() if why == "decay"] == [14, 15, 16, 17, 18]
    assert [r for r, why in reasons.items() if why == "spike"] == [29]
    # the plateau lasted in between: the boost was withheld, not merely undetected
    held = [10, 11, 12, 13, 23, 24, 25, 26, 28, 30]
    assert all(is_plateau(TRACE[: r - 1], CFG) for r in held)
    assert all(reasons[r] == "cosine" for r in held)
    # the multiplier grows only in a boost round, by exactly x1.15, and never within a window after one
    for r in range(2, 31):
        if reasons[r] == "plateau":
            assert scales[r] == pytest.approx(scales[r - 1] * 1.15, rel=1e-12)
        elif reasons[r] != "decay" and reasons[r] != "spike":
            assert scales[r] == scales[r - 1]
    assert [scales[r] for r in (8, 9, 13)] == pytest.approx([1.0, 1.15, 1.15])
    # each improving round halves the excess over 1
    assert [scales[r] for r in range(14, 19)] == pytest.approx([1.075, 1.0375, 1.01875, 1.009375, 1.0046875])
    assert scales[22] == pytest.approx(1.0046875 * 1.15) and scales[27] == pytest.approx(1.0046875 * 1.15**2)
    assert scales[29] == pytest.approx(scales[28] * 0.5) and scales[30] == scales[29]
    # otherwise the cosine shape is untouched: the LR is the cosine LR times the multiplier (the cap never bites)
    for r, d in enumerate(decisions, start=1):
        assert d.lr == pytest.approx(cosine_warm_restart_lr(r, CFG) * scales[r], rel=1e-12)
        assert d.lr <= CFG.max_lr


@pytest.mark.parametrize(
    ("losses", "improving"),
    [
        ([1.0, 0.99], True),  # exactly 1 % below the best before
        ([1.0, 0.995], False),
        ([0.8, 1.2, 0.85], False),  # better than the last round, not than the best
        ([1.0], False),
    ],
)
def test_improvement_is_one_percent_below_the_best_before(losses, improving):
    assert is_improvement(losses, CFG) is improving


def test_a_spike_damped_multiplier_is_not_raised_by_improvement():
    decision = schedule_round(20, [1.0, 0.5], ScheduleState(lr_scale=0.5), CFG)
    assert decision.reason == "cosine" and decision.state.lr_scale == 0.5


def test_schedule_state_json_round_trip():
    state = ScheduleState(lr_scale=1.15, boost_round=9)
    assert ScheduleState.from_json(json.loads(json.dumps(state.to_json()))) == state
    assert ScheduleState.from_json({}) == ScheduleState()
