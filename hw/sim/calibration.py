"""Calibration of the simulated arms: lerobot calibration files that match the simulated EPROM.

lerobot's SO follower/leader compare `<calibration_dir>/<id>.json` with Homing_Offset and the position
limits read from the motors (`FeetechMotorsBus.is_calibrated`); when they agree no prompt appears.
`provision` writes the same numbers into the simulated servos, `write_calibration_file` writes the file.

The conversions below are lerobot's normalization for SO-10x with `use_degrees=True`
(`MotorsBus._normalize` / `_unnormalize`); tests check them against lerobot itself.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from zk0.hw.sim.feetech import FeetechBus
from zk0.hw.sim.feetech_protocol import RESOLUTION

MOTOR_NAMES = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")
MOTOR_IDS = tuple(range(1, len(MOTOR_NAMES) + 1))
ROBOTS = ("so100", "so101")
ROLES = ("follower", "leader")
GRIPPER = "gripper"
_MAX_TICK = RESOLUTION - 1


@dataclass(frozen=True)
class JointCalibration:
    """One entry of a lerobot calibration file (field names are lerobot's MotorCalibration)."""

    id: int
    drive_mode: int
    homing_offset: int
    range_min: int
    range_max: int


# Ranges as a careful calibration session records them, in ticks either side of the half-turn homing
# middle (2047); the wrist roll is full-turn, as lerobot sets it, and the gripper's range starts closed.
# Leader and follower differ in offsets (their horns were mounted differently), not in ranges.
_HALF_RANGES = {"shoulder_pan": 1300, "shoulder_lift": 1180, "elbow_flex": 1150, "wrist_flex": 1150}
_FIXED_RANGES = {"wrist_roll": (0, _MAX_TICK), "gripper": (2000, 3400)}
_HOMING_OFFSETS = {"follower": (-1023, 412, -655, 1290, -310, 875), "leader": (318, -1455, 977, -240, 1501, -602)}


def _range(name: str) -> tuple[int, int]:
    if name in _FIXED_RANGES:
        return _FIXED_RANGES[name]
    return 2047 - _HALF_RANGES[name], 2047 + _HALF_RANGES[name]


_CALIBRATIONS: dict[str, dict[str, JointCalibration]] = {
    role: {
        name: JointCalibration(motor_id, 0, offset, *_range(name))
        for motor_id, name, offset in zip(MOTOR_IDS, MOTOR_NAMES, offsets, strict=True)
    }
    for role, offsets in _HOMING_OFFSETS.items()
}


def arm_calibration(role: str) -> dict[str, JointCalibration]:
    if role not in ROLES:
        raise ValueError(f"unknown arm role {role!r}; expected one of {ROLES}")
    return _CALIBRATIONS[role]


def write_calibration_file(calibration_dir: Path, arm_id: str, role: str) -> Path:
    """Write `<calibration_dir>/<arm_id>.json` in lerobot's (draccus) calibration format."""
    calibration_dir = Path(calibration_dir)
    calibration_dir.mkdir(parents=True, exist_ok=True)
    path = calibration_dir / f"{arm_id}.json"
    entries = {name: asdict(joint) for name, joint in arm_calibration(role).items()}
    path.write_text(json.dumps(entries, indent=4))
    return path


def provision(bus: FeetechBus, role: str) -> None:
    """Write the role's calibration into the servos' EPROM, keeping every shaft where it physically is."""
    with bus.lock:
        for joint in arm_calibration(role).values():
            servo = bus.servos[joint.id]
            shaft = servo.shaft
            servo.set("Homing_Offset", joint.homing_offset)
            servo.set("Min_Position_Limit", joint.range_min)
            servo.set("Max_Position_Limit", joint.range_max)
            servo.place(shaft - joint.homing_offset)


def ticks_to_joints(ticks: dict[int, float], calibration: dict[str, JointCalibration]) -> np.ndarray:
    """Present positions (homed ticks by id) -> lerobot normalized joints (degrees, gripper 0..100)."""
    joints = np.empty(len(MOTOR_NAMES))
    for index, name in enumerate(MOTOR_NAMES):
        cal = calibration[name]
        value = ticks[cal.id]
        if name == GRIPPER:
            bounded = min(cal.range_max, max(cal.range_min, value))
            joints[index] = (bounded - cal.range_min) / (cal.range_max - cal.range_min) * 100
        else:
            joints[index] = (value - (cal.range_min + cal.range_max) / 2) * 360 / _MAX_TICK
    return joints


def joints_to_ticks(joints: np.ndarray, calibration: dict[str, JointCalibration]) -> dict[int, float]:
    """Inverse of `ticks_to_joints`, clamped to each joint's calibrated range (the servo's limits)."""
    ticks = {}
    for index, name in enumerate(MOTOR_NAMES):
        cal = calibration[name]
        if name == GRIPPER:
            value = float(joints[index]) / 100 * (cal.range_max - cal.range_min) + cal.range_min
        else:
            value = float(joints[index]) * _MAX_TICK / 360 + (cal.range_min + cal.range_max) / 2
        ticks[cal.id] = min(cal.range_max, max(cal.range_min, value))
    return ticks


def calibrated_arm_bus(role: str, start_joints: np.ndarray | None = None, seed: int = 0) -> FeetechBus:
    """Six STS3215 servos (ids 1-6) calibrated for `role`, resting at `start_joints` (default: mid-range)."""
    bus = FeetechBus(list(MOTOR_IDS), seed=seed)
    provision(bus, role)
    joints = np.zeros(len(MOTOR_NAMES)) if start_joints is None else np.asarray(start_joints, dtype=float)
    bus.teleport(joints_to_ticks(joints, arm_calibration(role)))
    return bus
