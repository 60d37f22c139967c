"""The safety envelope: every joint target passes through it before it reaches a follower (rollout and
teleoperation alike).

Joint vectors are in lerobot's normalized units (SO-10x with `use_degrees=True`: degrees for joints 1-5,
percent 0..100 for the gripper). `safe_command` is the pure decision; `SafetyEnvelope` remembers the last
safe target and counts interventions. What a command guarantees:

- Always: finite, inside the calibrated joint limits.
- Not a hold: within `max_step` of the present position on every joint whose present position is within
  `max_step` of its limits (farther out, the target is the nearest limit: the arm is brought back into
  its range), and within `max_velocity / fps` of the last safe target wherever that does not contradict
  the step bound. When the arm lags its last target by more than both bounds together (blocked, pushed
  by hand), the step bound wins: the target moves toward where the arm is, which lowers the servo's pull
  instead of raising it. Clipping order: velocity, step, limits.
- With a workspace box: a target whose gripper tip (forward kinematics) leaves the box is held; an arm
  already outside may move toward the box, never farther from it.
- A hold (`held=True`): the target is the last safe target (zero commanded velocity), or, before there is
  one, the present position clipped into the limits (the arm stays where it is). A hold is not bounded by
  `max_step`: an arm pushed away from its last target is pulled back to it.
- Non-finite present position and no last safe target: no target is safe (the arm's position is unknown),
  so `PositionUnknown` (a `ConnectionError`) is raised and nothing must be sent; the servos keep their last
  goal, which is the only true hold. Loops treat it like a failed bus read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from lerobot.motors import MotorCalibration, MotorNormMode

from zk0.hw import kinematics
from zk0.hw.config import SafetySettings

# STS3215 resolution: lerobot's DEGREES normalization maps ticks to degrees with (4096 - 1) ticks per turn.
_STS3215_MAX_TICK = 4095
GRIPPER = "gripper"
INTERVENTIONS = ("non-finite", "joint-limit", "step", "velocity", "workspace")


@dataclass(frozen=True)
class JointLimits:
    """Per-joint lower/upper bounds in normalized units, in motor order."""

    names: tuple[str, ...]
    lower: np.ndarray
    upper: np.ndarray


def normalized_range(calibration: MotorCalibration, norm_mode: MotorNormMode) -> tuple[float, float]:
    """The normalized values that lerobot maps a motor's calibrated tick range onto."""
    if norm_mode is MotorNormMode.DEGREES:
        half_span = (calibration.range_max - calibration.range_min) / 2 * 360 / _STS3215_MAX_TICK
        return -half_span, half_span
    if norm_mode is MotorNormMode.RANGE_0_100:
        return 0.0, 100.0
    if norm_mode is MotorNormMode.RANGE_M100_100:
        return -100.0, 100.0
    raise ValueError(f"unsupported normalization mode {norm_mode}")


def limits_from_calibration(
    calibration: Mapping[str, MotorCalibration], norm_modes: Mapping[str, MotorNormMode]
) -> JointLimits:
    """Joint limits for the motors named in `norm_modes`, in that order."""
    missing = [name for name in norm_modes if name not in calibration]
    if missing:
        raise ValueError(f"calibration has no entry for motor {missing[0]!r}")
    bounds = [normalized_range(calibration[name], mode) for name, mode in norm_modes.items()]
    return JointLimits(
        names=tuple(norm_modes),
        lower=np.array([lo for lo, _ in bounds], dtype=np.float64),
        upper=np.array([hi for _, hi in bounds], dtype=np.float64),
    )


@dataclass(frozen=True)
class WorkspaceBox:
    """Where the gripper tip may go: a box in metres, world frame (x forward from the base, y robot-left,
    z up from the table), checked with the forward kinematics of `robot` ("so100" or "so101")."""

    lower: np.ndarray
    upper: np.ndarray
    robot: str = "so101"

    def __post_init__(self) -> None:
        lower, upper = np.asarray(self.lower, dtype=np.float64), np.asarray(self.upper, dtype=np.float64)
        if lower.shape != (3,) or upper.shape != (3,) or not (np.isfinite(lower).all() and np.isfinite(upper).all()):
            raise ValueError("workspace: lower and upper must be three finite numbers each")
        if not (lower < upper).all():
            raise ValueError(f"workspace: lower {lower.tolist()} must be below upper {upper.tolist()} on every axis")
        kinematics.geometry_for(self.robot)  # an unknown robot fails here, not on the first tick

    def distance_outside(self, joints: np.ndarray) -> float:
        """How far (metres) the gripper tip of `joints` is outside the box; 0 inside."""
        tip = kinematics.forward(joints, kinematics.geometry_for(self.robot)).tip
        return float(np.linalg.norm(np.maximum(self.lower - tip, 0) + np.maximum(tip - self.upper, 0)))


@dataclass(frozen=True)
class EnvelopeSpec:
    """The envelope's bounds, per joint in motor order (see `envelope_spec` to build one from the config)."""

    limits: JointLimits
    max_step: np.ndarray  # per joint, units per tick, bound on |target - present|
    max_velocity: np.ndarray  # per joint, units per second, bound on |target - previous safe target| * fps
    fps: float
    workspace: WorkspaceBox | None = None

    def __post_init__(self) -> None:
        n = len(self.limits.names)
        for name in ("max_step", "max_velocity"):
            value = np.asarray(getattr(self, name))
            if value.shape != (n,) or not (np.isfinite(value).all() and (value > 0).all()):
                raise ValueError(f"{name}: expected {n} positive finite values, got {value.tolist()}")
        if not (np.isfinite(self.fps) and self.fps > 0):
            raise ValueError(f"fps: must be positive, got {self.fps}")
        if not (self.limits.lower <= self.limits.upper).all():
            raise ValueError("limits: lower above upper")
        if self.workspace is not None and self.limits.names != kinematics.JOINT_NAMES:
            raise ValueError(f"workspace: needs the SO-10x joints {kinematics.JOINT_NAMES}, got {self.limits.names}")


@dataclass(frozen=True)
class SafeCommand:
    """The target to send. `interventions` name what changed it (see `INTERVENTIONS`); `held` says it is
    a hold (see the module docstring for what a hold guarantees)."""

    target: np.ndarray
    held: bool
    interventions: tuple[str, ...]


class PositionUnknown(ConnectionError):
    """The present position is not finite and no safe target was sent before: send nothing."""


def safe_command(target: np.ndarray, present: np.ndarray, last_safe: np.ndarray | None, spec: EnvelopeSpec) -> SafeCommand:
    """The safe version of `target` given the arm's `present` position and the last safe target sent."""
    target, present = _joints(target, spec, "target"), _joints(present, spec, "present")
    if last_safe is not None:
        last_safe = _joints(last_safe, spec, "last_safe")
        if not np.isfinite(last_safe).all():
            raise ValueError("last_safe: must be a target safe_command returned (finite)")
    if not (np.isfinite(target).all() and np.isfinite(present).all()):
        return _hold(present, last_safe, spec, ("non-finite",))
    interventions = []
    boxes = [("step", present - spec.max_step, present + spec.max_step), ("joint-limit", spec.limits.lower, spec.limits.upper)]
    if last_safe is not None:
        reach = spec.max_velocity / spec.fps
        boxes.insert(0, ("velocity", last_safe - reach, last_safe + reach))
    safe = target
    for name, lower, upper in boxes:
        clipped = np.clip(safe, lower, upper)
        if not np.array_equal(clipped, safe):
            interventions.append(name)
        safe = clipped
    if spec.workspace is not None and (outside := spec.workspace.distance_outside(safe)) > 0:
        reference = last_safe if last_safe is not None else np.clip(present, spec.limits.lower, spec.limits.upper)
        # Moving out of the box is held; an arm already outside may still move back toward it.
        if outside > spec.workspace.distance_outside(reference):
            return _hold(present, last_safe, spec, (*interventions, "workspace"))
    return SafeCommand(safe, False, tuple(interventions))


def _joints(values: np.ndarray, spec: EnvelopeSpec, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.shape != spec.limits.lower.shape:
        raise ValueError(f"{name}: expected {len(spec.limits.names)} joint values, got shape {array.shape}")
    return array


def _hold(present: np.ndarray, last_safe: np.ndarray | None, spec: EnvelopeSpec, interventions: tuple[str, ...]) -> SafeCommand:
    if last_safe is not None:
        return SafeCommand(last_safe.copy(), True, interventions)
    if not np.isfinite(present).all():
        raise PositionUnknown(f"present position {present.tolist()} is not finite and no safe target was sent yet")
    return SafeCommand(np.clip(present, spec.limits.lower, spec.limits.upper), True, interventions)


class SafetyEnvelope:
    """`safe_command` with memory: the last safe target, and how often each intervention fired (once per
    tick at most). `reset()` when the arm was moved outside the loop (a new episode)."""

    def __init__(self, spec: EnvelopeSpec) -> None:
        self.spec = spec
        self.last_safe: np.ndarray | None = None
        self.counts: dict[str, int] = dict.fromkeys(INTERVENTIONS, 0)

    def __call__(self, target: np.ndarray, present: np.ndarray) -> SafeCommand:
        """The safe command, remembered as sent (for loops whose send cannot fail, e.g. the lock-step sim)."""
        command = self.propose(target, present)
        self.sent(command)
        return command

    def propose(self, target: np.ndarray, present: np.ndarray) -> SafeCommand:
        """The safe command for `target`, not yet remembered: call `sent` once it reached the bus, so that a
        failed write never becomes the reference of the next tick's velocity bound or hold."""
        return safe_command(target, present, self.last_safe, self.spec)

    def sent(self, command: SafeCommand) -> None:
        self.last_safe = command.target
        for name in command.interventions:
            self.counts[name] += 1

    def reset(self) -> None:
        self.last_safe = None
        self.counts = dict.fromkeys(INTERVENTIONS, 0)


def hold_target(present: np.ndarray, last_goal: np.ndarray | None, names: Sequence[str]) -> np.ndarray:
    """Where an arm that must stop is commanded: its joints where they are, so the motion stops at once, and its
    gripper at its last goal. A gripper squeezing an object rests short of its goal; commanding where it is would
    take the force off and let the object slip out while the arm holds."""
    target = np.array(present, dtype=np.float64)
    if last_goal is not None:
        gripper = np.array([name == GRIPPER for name in names])
        target[gripper] = np.asarray(last_goal, dtype=np.float64)[gripper]
    return target


def envelope_spec(limits: JointLimits, settings: SafetySettings, fps: float, robot: str = "so101") -> EnvelopeSpec:
    """The envelope for a follower with these calibrated `limits`, from the config's safety settings
    (gripper bounds for the motor named "gripper", degree bounds for the others). `robot` ("so100" or
    "so101", the config's robot_type) picks the kinematics the workspace box is checked with."""
    gripper = np.array([name == GRIPPER for name in limits.names])
    workspace = settings.workspace
    return EnvelopeSpec(
        limits=limits,
        max_step=np.where(gripper, settings.max_gripper_step, settings.max_step_deg),
        max_velocity=np.where(gripper, settings.max_gripper_velocity, settings.max_velocity_deg_s),
        fps=float(fps),
        workspace=None if workspace is None else WorkspaceBox(np.array(workspace.lower), np.array(workspace.upper), robot),
    )
