"""The safety envelope: table-driven cases with real numbers, and properties over arbitrary policy outputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lerobot.motors import MotorCalibration, MotorNormMode

from zk0.hw import kinematics
from zk0.hw.config import SafetySettings, WorkspaceSettings
from zk0.hw.safety import (
    hold_target,
    INTERVENTIONS,
    EnvelopeSpec,
    JointLimits,
    PositionUnknown,
    SafetyEnvelope,
    WorkspaceBox,
    envelope_spec,
    limits_from_calibration,
    safe_command,
)
from zk0.hw.sim.calibration import arm_calibration

NAN, INF = math.nan, math.inf
FPS = 30.0
# elbow_flex calibrated +-1024 ticks around the middle: +-90.02 degrees; the gripper 0..100 percent.
ELBOW_GRIPPER = limits_from_calibration(
    {"elbow_flex": MotorCalibration(id=3, drive_mode=0, homing_offset=0, range_min=2047 - 1024, range_max=2047 + 1024),
     "gripper": MotorCalibration(id=6, drive_mode=0, homing_offset=0, range_min=2000, range_max=3400)},
    {"elbow_flex": MotorNormMode.DEGREES, "gripper": MotorNormMode.RANGE_0_100},
)
TOP = 1024 * 360 / 4095  # 90.02 degrees
# 10 units per tick either way; 180 deg/s and 200 %/s: 6 and 6.67 units per tick at 30 fps.
SPEC = EnvelopeSpec(ELBOW_GRIPPER, max_step=np.array([10.0, 10.0]), max_velocity=np.array([180.0, 200.0]), fps=FPS)


def sim_follower_limits() -> JointLimits:
    calibration = {name: MotorCalibration(**vars(joint)) for name, joint in arm_calibration("follower").items()}
    modes = {name: MotorNormMode.RANGE_0_100 if name == "gripper" else MotorNormMode.DEGREES for name in calibration}
    return limits_from_calibration(calibration, modes)


SO101 = sim_follower_limits()


def test_limits_from_calibration_in_real_units() -> None:
    assert ELBOW_GRIPPER.upper.tolist() == pytest.approx([TOP, 100.0])
    assert ELBOW_GRIPPER.lower.tolist() == pytest.approx([-TOP, 0.0])
    with pytest.raises(ValueError, match="no entry for motor 'wrist_flex'"):
        limits_from_calibration({}, {"wrist_flex": MotorNormMode.DEGREES})


@pytest.mark.parametrize(
    ("target", "present", "last_safe", "expected", "held", "interventions"),
    [
        # inside every bound: sent unchanged
        ([5, 52], [0, 50], [2, 48], [5, 52], False, ()),
        # 30 degrees away in one tick: 10 per tick
        ([30, 50], [0, 50], None, [10, 50], False, ("step",)),
        # 9 degrees within one tick of a target at 0: 180 deg/s is 6 per tick
        ([9, 50], [0, 50], [0, 50], [6, 50], False, ("velocity",)),
        # past the calibrated range
        ([95, 50], [88, 50], None, [TOP, 50], False, ("joint-limit",)),
        # 1e30 both ways: the velocity bound catches it first
        ([1e30, -1e30], [0, 50], [0, 50], [6, 50 - 200 / 30], False, ("velocity",)),
        # the arm lags its last target by 30: the step bound wins and the target moves toward the arm
        ([40, 50], [30, 50], [0, 50], [20, 50], False, ("velocity", "step")),
        # the arm is 30 degrees past its range: the target is the nearest limit, bringing it back in
        ([120, 50], [120, 50], None, [TOP, 50], False, ("joint-limit",)),
        # non-finite targets hold the last safe target ...
        ([NAN, 52], [0, 50], [2, 48], [2, 48], True, ("non-finite",)),
        ([5, -INF], [0, 50], [2, 48], [2, 48], True, ("non-finite",)),
        # ... or, before there is one, the present position clipped into the limits
        ([INF, 50], [100, 50], None, [TOP, 50], True, ("non-finite",)),
        # a non-finite present position holds too
        ([0, 50], [NAN, 50], [1, 49], [1, 49], True, ("non-finite",)),
    ],
)
def test_safe_command_table(target, present, last_safe, expected, held, interventions) -> None:
    command = safe_command(np.array(target, float), np.array(present, float),
                           None if last_safe is None else np.array(last_safe, float), SPEC)
    assert command.target.tolist() == pytest.approx(expected)
    assert (command.held, command.interventions) == (held, interventions)


def test_unknown_position_and_nothing_to_hold_sends_nothing() -> None:
    with pytest.raises(PositionUnknown, match="not finite and no safe target"):
        safe_command(np.array([0.0, 50.0]), np.array([NAN, 50.0]), None, SPEC)
    assert issubclass(PositionUnknown, ConnectionError)  # loops drop the tick as a failed bus read


@pytest.mark.parametrize(
    ("target", "present", "last_safe", "message"),
    [
        ([0.0], [0.0, 50.0], None, "target: expected 2 joint values"),
        ([0.0, 50.0], [0.0, 50.0, 1.0], None, "present: expected 2 joint values"),
        ([0.0, 50.0], [0.0, 50.0], [NAN, 50.0], "last_safe: must be a target safe_command returned"),
    ],
)
def test_malformed_vectors_are_programming_errors(target, present, last_safe, message) -> None:
    with pytest.raises(ValueError, match=message):
        safe_command(np.array(target), np.array(present), None if last_safe is None else np.array(last_safe), SPEC)


finite_or_not = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([NAN, INF, -INF, 1e30, -1e30, 500.0, -500.0])
)


@st.composite
def situations(draw, limits: JointLimits):
    n = len(limits.names)
    target = np.array(draw(st.lists(finite_or_not, min_size=n, max_size=n)))
    present = np.array(draw(st.lists(st.one_of(st.floats(-300, 300), st.sampled_from([NAN, INF])), min_size=n, max_size=n)))
    last_safe = draw(st.one_of(st.none(), st.tuples(*(st.floats(lo, hi) for lo, hi in zip(limits.lower, limits.upper)))))
    return target, present, None if last_safe is None else np.array(last_safe)


def check_guarantees(spec: EnvelopeSpec, target, present, last_safe) -> None:
    """What the module docstring promises, for one command."""
    try:
        command = safe_command(target, present, last_safe, spec)
    except PositionUnknown:
        assert last_safe is None and not np.isfinite(present).all()
        return
    safe, lower, upper = command.target, spec.limits.lower, spec.limits.upper
    assert np.isfinite(safe).all() and (lower <= safe).all() and (safe <= upper).all()
    assert set(command.interventions) <= set(INTERVENTIONS)
    if command.held:
        expected = last_safe if last_safe is not None else np.clip(present, lower, upper)
        np.testing.assert_array_equal(safe, expected)
        return
    assert np.isfinite(target).all() and np.isfinite(present).all()
    step, reach, eps = spec.max_step, spec.max_velocity / spec.fps, 1e-9
    near_range = (present >= lower - step) & (present <= upper + step)
    assert (np.abs(safe - present)[near_range] <= step[near_range] + eps).all()
    if last_safe is not None:
        feasible = near_range & (np.abs(present - last_safe) <= step + reach)
        assert (np.abs(safe - last_safe)[feasible] <= reach[feasible] + eps).all()
    if not command.interventions:
        np.testing.assert_array_equal(safe, target)


@settings(max_examples=400, deadline=None)
@given(situations(ELBOW_GRIPPER))
def test_every_command_is_finite_inside_the_limits_and_bounds_or_a_hold(situation) -> None:
    check_guarantees(SPEC, *situation)


WORKSPACE = WorkspaceBox(np.array([0.15, -0.25, 0.02]), np.array([0.40, 0.25, 0.30]))
SO101_SPEC = envelope_spec(SO101, SafetySettings(), FPS)
SO101_BOXED = EnvelopeSpec(SO101, SO101_SPEC.max_step, SO101_SPEC.max_velocity, FPS, WORKSPACE)


@settings(max_examples=200, deadline=None)
@given(situations(SO101))
def test_six_joints_with_a_workspace_box(situation) -> None:
    check_guarantees(SO101_BOXED, *situation)
    target, present, last_safe = situation
    try:
        command = safe_command(target, present, last_safe, SO101_BOXED)
    except PositionUnknown:
        return
    if not command.held:
        reference = last_safe if last_safe is not None else np.clip(present, SO101.lower, SO101.upper)
        assert WORKSPACE.distance_outside(command.target) <= WORKSPACE.distance_outside(reference)


def tip(joints) -> np.ndarray:
    return kinematics.forward(np.array(joints, float)).tip


def test_workspace_box_holds_a_tip_leaving_it_and_lets_an_outside_arm_come_back() -> None:
    home = np.zeros(6)  # the L pose: tip ~0.36 m forward, ~0.26 m up
    box = WorkspaceBox(tip(home) - 0.01, tip(home) + 0.01)
    spec = EnvelopeSpec(SO101, SO101_SPEC.max_step, SO101_SPEC.max_velocity, FPS, box)
    assert box.distance_outside(home) == 0.0
    lift = home + [0, 5, 0, 0, 0, 0]  # tilting the upper arm 5 degrees moves the tip ~2 cm
    assert box.distance_outside(lift) > 0.005
    command = safe_command(lift, home, None, spec)
    assert command.held and command.interventions == ("workspace",) and command.target.tolist() == home.tolist()
    command = safe_command(lift, home, home + [0, 0, 0, 0, 0, 40], spec)  # holds the last safe target
    assert command.held and command.target[5] == 40
    closing = home + [0, 0, 0, 0, 0, 5]  # the gripper does not move the tip
    command = safe_command(closing, home, None, spec)
    assert not command.held and command.target.tolist() == closing.tolist()
    # an arm outside the box may move toward it, not away
    outside = home + [0, 8, 0, 0, 0, 0]
    assert not safe_command(home + [0, 6, 0, 0, 0, 0], outside, outside, spec).held
    assert safe_command(home + [0, 10, 0, 0, 0, 0], outside, outside, spec).held


def test_envelope_remembers_the_last_safe_target_and_counts_interventions() -> None:
    envelope = SafetyEnvelope(SPEC)
    present = np.array([0.0, 50.0])
    sent = []
    for target in ([30, 50], [30, 50], [NAN, 50], [30, 50]):
        command = envelope(np.array(target, float), present)
        sent.append(command.target.tolist())
        present = command.target  # an arm that follows exactly
    # 10 (step; no previous target yet), then 6 per tick (velocity), a hold, then 6 more
    assert sent == [[10, 50], [16, 50], [16, 50], [22, 50]]
    assert envelope.counts == {"non-finite": 1, "joint-limit": 0, "step": 1, "velocity": 2, "workspace": 0}
    envelope.reset()
    assert envelope.last_safe is None and set(envelope.counts.values()) == {0}
    assert envelope(np.array([30.0, 50.0]), np.array([22.0, 50.0])).target.tolist() == [30, 50]


def test_envelope_spec_from_settings_in_real_units() -> None:
    settings = SafetySettings(max_step_deg=5, max_gripper_step=7, max_velocity_deg_s=90, max_gripper_velocity=120,
                              workspace=WorkspaceSettings([0.1, -0.3, 0.0], [0.45, 0.3, 0.4]))
    spec = envelope_spec(SO101, settings, 30, robot="so100")
    assert spec.max_step.tolist() == [5, 5, 5, 5, 5, 7] and spec.max_velocity.tolist() == [90] * 5 + [120]
    assert spec.fps == 30.0 and spec.workspace.robot == "so100"
    assert spec.workspace.lower.tolist() == [0.1, -0.3, 0.0] and spec.workspace.upper.tolist() == [0.45, 0.3, 0.4]
    assert envelope_spec(SO101, SafetySettings(), 30).workspace is None


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: EnvelopeSpec(ELBOW_GRIPPER, np.array([10.0]), np.array([1.0, 1.0]), FPS), "max_step: expected 2"),
        (lambda: EnvelopeSpec(ELBOW_GRIPPER, np.array([10.0, 0.0]), np.array([1.0, 1.0]), FPS), "max_step: expected 2 positive"),
        (lambda: EnvelopeSpec(ELBOW_GRIPPER, np.array([1.0, 1.0]), np.array([NAN, 1.0]), FPS), "max_velocity"),
        (lambda: EnvelopeSpec(ELBOW_GRIPPER, np.array([1.0, 1.0]), np.array([1.0, 1.0]), 0.0), "fps: must be positive"),
        (lambda: EnvelopeSpec(ELBOW_GRIPPER, np.array([1.0, 1.0]), np.array([1.0, 1.0]), FPS, WORKSPACE), "workspace: needs"),
        (lambda: WorkspaceBox(np.array([0.0, 0.0, 0.5]), np.array([1.0, 1.0, 0.4])), "must be below upper"),
        (lambda: WorkspaceBox(np.array([0.0, 0.0]), np.array([1.0, 1.0, 1.0])), "three finite numbers"),
        (lambda: WorkspaceBox(np.zeros(3), np.ones(3), robot="so102"), "unknown arm 'so102'"),
        (lambda: SafetySettings(max_step_deg=0), "max_step_deg: must be positive"),
        (lambda: SafetySettings(max_gripper_velocity=INF), "max_gripper_velocity: must be positive"),
    ],
)
def test_invalid_specs_are_refused(build, message) -> None:
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize(("present", "last_goal", "expected"), [
    # an arm moving towards its goal stops where it is; a gripper closed on a cube (resting at 30, goal 5) keeps squeezing
    ([10.0, -20.0, 5.0, 0.0, 3.0, 30.0], [12.0, -25.0, 5.0, 1.0, 3.0, 5.0], [10.0, -20.0, 5.0, 0.0, 3.0, 5.0]),
    # nothing sent yet: everything where it is
    ([10.0, -20.0, 5.0, 0.0, 3.0, 30.0], None, [10.0, -20.0, 5.0, 0.0, 3.0, 30.0]),
])
def test_a_hold_stops_the_joints_where_they_are_and_keeps_the_grip(present, last_goal, expected) -> None:
    names = ["shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper"]
    target = hold_target(np.array(present), None if last_goal is None else np.array(last_goal), names)
    assert target.tolist() == expected and target is not present
