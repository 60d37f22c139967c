"""lerobot's own SO follower/leader classes on the simulated arms, with nothing changed but the port."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from lerobot.motors import Motor, MotorNormMode
from lerobot.motors.feetech import FeetechMotorsBus
from lerobot.robots import RobotConfig, so_follower  # noqa: F401  (importing registers the so10x types)
from lerobot.robots.utils import make_robot_from_config
from lerobot.teleoperators import TeleoperatorConfig, so_leader  # noqa: F401
from lerobot.teleoperators.utils import make_teleoperator_from_config

from zk0.hw.sim.calibration import (
    MOTOR_IDS,
    MOTOR_NAMES,
    arm_calibration,
    calibrated_arm_bus,
    joints_to_ticks,
    ticks_to_joints,
)
from zk0.hw.sim.feetech_protocol import ERRBIT_OVERLOAD
from zk0.hw.sim.pty_bus import PtyBusServer
from tests.hw.conftest import connect_retrying


def no_prompt(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args):
        raise AssertionError("lerobot asked for interactive calibration")

    monkeypatch.setattr("builtins.input", refuse)


@pytest.mark.parametrize("robot_type", ["so101_follower", "so100_follower"])
def test_follower_connects_observes_and_moves(sim_arm, tmp_path, monkeypatch, robot_type):
    no_prompt(monkeypatch)
    port = sim_arm("follower", robot=robot_type.split("_")[0])
    config_class = RobotConfig.get_choice_class(robot_type)
    robot = make_robot_from_config(
        config_class(port=port, id="sim_follower", calibration_dir=tmp_path / "calibration")
    )
    connect_retrying(robot)
    try:
        assert robot.is_calibrated
        observation = robot.get_observation()
        assert set(observation) == {f"{name}.pos" for name in MOTOR_NAMES}
        assert all(abs(observation[f"{name}.pos"]) < 1.0 for name in MOTOR_NAMES[:5])
        target = {"shoulder_pan.pos": 30.0, "elbow_flex.pos": -20.0, "gripper.pos": 80.0}
        robot.send_action(target)
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            observation = robot.get_observation()
            if all(abs(observation[key] - value) < 0.5 for key, value in target.items()):
                break
            time.sleep(0.02)
        assert all(abs(observation[key] - value) < 0.5 for key, value in target.items()), observation
    finally:
        robot.disconnect()


@pytest.mark.parametrize("teleop_type", ["so101_leader", "so100_leader"])
def test_leader_connects_without_prompt(sim_arm, tmp_path, monkeypatch, teleop_type):
    no_prompt(monkeypatch)
    port = sim_arm("leader", robot=teleop_type.split("_")[0])
    config_class = TeleoperatorConfig.get_choice_class(teleop_type)
    leader = make_teleoperator_from_config(
        config_class(port=port, id="sim_leader", calibration_dir=tmp_path / "calibration")
    )
    connect_retrying(leader)
    try:
        assert leader.is_calibrated
        action = leader.get_action()
        assert set(action) == {f"{name}.pos" for name in MOTOR_NAMES}
    finally:
        leader.disconnect()


def lerobot_bus(port: str, role: str) -> FeetechMotorsBus:
    from lerobot.motors import MotorCalibration

    calibration = {name: MotorCalibration(**vars(joint)) for name, joint in arm_calibration(role).items()}
    modes = [MotorNormMode.DEGREES] * 5 + [MotorNormMode.RANGE_0_100]
    motors = {name: Motor(i, "sts3215", mode) for name, i, mode in zip(MOTOR_NAMES, MOTOR_IDS, modes, strict=True)}
    return FeetechMotorsBus(port, motors, calibration)


def test_normalization_matches_lerobot():
    bus = lerobot_bus("/dev/null", "follower")
    calibration = arm_calibration("follower")
    joints = np.array([37.5, -80.0, 12.0, 95.0, -150.0, 42.0])
    ticks = joints_to_ticks(joints, calibration)
    assert bus._unnormalize(dict(enumerate(joints, start=1))) == {i: int(v) for i, v in ticks.items()}
    normalized = bus._normalize({i: int(v) for i, v in ticks.items()})
    assert np.allclose(ticks_to_joints({i: int(v) for i, v in ticks.items()}, calibration),
                       [normalized[i] for i in MOTOR_IDS])


@pytest.fixture
def faulty_follower():
    bus = calibrated_arm_bus("follower")
    with PtyBusServer(bus) as server:
        lerobot = lerobot_bus(server.port, "follower")
        connect_retrying(lerobot)
        yield bus, lerobot
        lerobot.port_handler.closePort()


def test_dropped_replies_are_retried_by_lerobot(faulty_follower):
    bus, lerobot = faulty_follower
    bus.faults.drop_next = 2
    positions = lerobot.sync_read("Present_Position", num_retry=2)
    assert set(positions) == set(MOTOR_NAMES)


def test_garbled_replies_raise_connection_error_without_hanging(faulty_follower):
    bus, lerobot = faulty_follower
    bus.faults.garble_rate = 1.0
    started = time.monotonic()
    with pytest.raises(ConnectionError):
        lerobot.sync_read("Present_Position", num_retry=2)
    assert time.monotonic() - started < 2.0


def test_overload_bit_surfaces_as_runtime_error(faulty_follower):
    bus, lerobot = faulty_follower
    bus.faults.error_bits[3] = ERRBIT_OVERLOAD
    with pytest.raises(RuntimeError, match="Overload"):
        lerobot.read("Present_Position", "elbow_flex")


def test_calibration_file_is_lerobot_loadable(tmp_path: Path):
    import draccus
    from lerobot.motors import MotorCalibration

    from zk0.hw.sim.calibration import write_calibration_file

    path = write_calibration_file(tmp_path, "arm", "leader")
    with path.open() as f:
        loaded = draccus.load(dict[str, MotorCalibration], f)
    assert loaded["wrist_flex"].homing_offset == arm_calibration("leader")["wrist_flex"].homing_offset
