"""The safety clamp applied to every joint target before it reaches the follower.

Pure functions over joint vectors in lerobot's normalized units (SO-10x with `use_degrees=True`:
degrees for joints 1-5, 0..100 for the gripper). Two limits, in this order:
1. `max_relative_target`: a target may move at most this far from the present position in one tick
   (the same rule as lerobot's `ensure_safe_goal_position`, vectorized; lerobot's version logs a warning
   per clipped tick and reads the bus again, which a 30 Hz loop cannot afford);
2. the calibrated joint range, so a target never leaves what the arm was calibrated to reach.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from lerobot.motors import MotorCalibration, MotorNormMode

# STS3215 resolution: lerobot's DEGREES normalization maps ticks to degrees with (4096 - 1) ticks per turn.
_STS3215_MAX_TICK = 4095


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


def clamp_target(
    target: np.ndarray, present: np.ndarray, limits: JointLimits, max_relative_target: float | None
) -> np.ndarray:
    """The joint target that is safe to send, given where the arm is now."""
    safe = np.asarray(target, dtype=np.float64)
    if max_relative_target is not None:
        safe = np.clip(safe, present - max_relative_target, present + max_relative_target)
    return np.clip(safe, limits.lower, limits.upper)
