"""Connecting arms without a prompt: a calibration file that disagrees with the motors is refused, not written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lerobot.motors import MotorCalibration

from zk0.hw.config import ArmConfig
from zk0.hw.robots import CalibrationError, calibration_difference, connect_without_prompt, make_follower, read_motor_calibration

ON_MOTOR = {
    "shoulder_pan": MotorCalibration(id=1, drive_mode=0, homing_offset=-1023, range_min=747, range_max=3347),
    "gripper": MotorCalibration(id=6, drive_mode=0, homing_offset=875, range_min=2000, range_max=3400),
}


def _changed(motor: str, **fields) -> dict[str, MotorCalibration]:
    return {**ON_MOTOR, motor: MotorCalibration(**{**vars(ON_MOTOR[motor]), **fields})}


@pytest.mark.parametrize(
    ("on_file", "expected"),
    [
        (ON_MOTOR, None),
        (_changed("gripper", drive_mode=1), None),  # lerobot does not compare it (the bus never reports it)
        (_changed("shoulder_pan", homing_offset=5), "shoulder_pan.homing_offset: 5 in the file, -1023 on the motor"),
        (_changed("gripper", range_max=3000), "gripper.range_max: 3000 in the file, 3400 on the motor"),
        ({"gripper": ON_MOTOR["gripper"]}, "shoulder_pan: not in the file"),
        ({**ON_MOTOR, "elbow_flex": ON_MOTOR["gripper"]}, "elbow_flex: in the file but not on the bus"),
    ],
)
def test_calibration_difference_names_the_first_motor_and_field(on_file, expected) -> None:
    assert calibration_difference(on_file, ON_MOTOR) == expected


def _follower(port: str, calibration_dir: Path, arm_id: str = "sim_follower"):
    return make_follower(ArmConfig(port, arm_id, calibration_dir), cameras=(), read_retries=3)


def test_no_calibration_file_is_refused(sim_arm, tmp_path: Path) -> None:
    robot = _follower(sim_arm("follower"), tmp_path / "calibration", arm_id="unknown_arm")
    with pytest.raises(CalibrationError, match="no calibration file .*unknown_arm.json; run lerobot-calibrate"):
        connect_without_prompt(robot)


def test_a_mismatching_file_is_refused_unless_writing_is_asked_for(sim_arm, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("builtins.input", lambda *_: pytest.fail("lerobot asked for interactive calibration"))
    port = sim_arm("follower")
    calibration_dir = tmp_path / "calibration"
    path = calibration_dir / "sim_follower.json"
    provisioned = json.loads(path.read_text())
    wrong = {**provisioned, "elbow_flex": {**provisioned["elbow_flex"], "range_min": provisioned["elbow_flex"]["range_min"] + 40}}
    path.write_text(json.dumps(wrong))

    robot = _follower(port, calibration_dir)
    with pytest.raises(CalibrationError) as refusal:
        connect_without_prompt(robot)
    message = str(refusal.value)
    assert "sim_follower" in message and str(path) in message and "\n" not in message
    assert f"elbow_flex.range_min: {wrong['elbow_flex']['range_min']} in the file, " \
           f"{provisioned['elbow_flex']['range_min']} on the motor" in message
    assert not robot.bus.is_connected  # refused before lerobot configured (and powered) anything

    robot = _follower(port, calibration_dir)
    connect_without_prompt(robot, write_calibration=True)
    try:
        assert robot.is_connected and robot.is_calibrated
        on_motors = read_motor_calibration(robot.bus)
        assert on_motors["elbow_flex"].range_min == wrong["elbow_flex"]["range_min"]
        assert calibration_difference(robot.calibration, on_motors) is None
    finally:
        robot.disconnect()
    # the motors now hold the file: connecting again needs no flag
    robot = _follower(port, calibration_dir)
    connect_without_prompt(robot)
    robot.disconnect()
