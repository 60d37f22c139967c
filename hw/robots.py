"""lerobot follower, leader and cameras built from zk0's hardware description (real ports or the sim rig's).

Arms connect with the calibration files the config names and never prompt: when the motors' EPROM
disagrees with the file, the file is written to the motors, which is what pressing ENTER at lerobot's
calibration prompt does.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

from lerobot.cameras import CameraConfig as LeRobotCameraConfig
from lerobot.cameras.opencv import OpenCVCameraConfig
from lerobot.cameras.zmq import ZMQCameraConfig
from lerobot.robots import Robot
from lerobot.robots.so_follower import SOFollower, SOFollowerRobotConfig
from lerobot.teleoperators import Teleoperator
from lerobot.teleoperators.so_leader import SOLeader, SOLeaderTeleopConfig

from zk0.hw.config import ArmConfig, CameraConfig
from zk0.hw.safety import JointLimits, limits_from_calibration

logger = logging.getLogger(__name__)


class CalibrationError(RuntimeError):
    """An arm has no usable calibration file; calibrate it with lerobot-calibrate first."""


def camera_config(camera: CameraConfig) -> LeRobotCameraConfig:
    if camera.type == "zmq":
        return ZMQCameraConfig(
            server_address=camera.host, port=camera.port, camera_name=camera.name,
            width=camera.width, height=camera.height, fps=camera.fps,
        )
    return OpenCVCameraConfig(index_or_path=camera.index_or_path, width=camera.width, height=camera.height, fps=camera.fps)


# SO-100 and SO-101 share lerobot's SOFollower/SOLeader classes; `robot_type` only names the hardware.


def make_follower(arm: ArmConfig, cameras: Sequence[CameraConfig], read_retries: int) -> Robot:
    """The follower arm with every configured camera. zk0 clamps targets itself (see zk0.hw.safety)."""
    robot_config = SOFollowerRobotConfig(
        port=arm.port,
        id=arm.id,
        calibration_dir=arm.calibration_dir,
        cameras={camera.name: camera_config(camera) for camera in cameras},
        use_degrees=True,
        num_read_retries=read_retries,
    )
    return SOFollower(robot_config)


def make_leader(arm: ArmConfig, read_retries: int) -> Teleoperator:
    teleop_config = SOLeaderTeleopConfig(
        port=arm.port, id=arm.id, calibration_dir=arm.calibration_dir, use_degrees=True, num_read_retries=read_retries,
    )
    return SOLeader(teleop_config)


CONNECT_ATTEMPTS = 3


def connect_without_prompt(device: Robot | Teleoperator, attempts: int = CONNECT_ATTEMPTS) -> None:
    """Connect an arm using its calibration file; raise `CalibrationError` if there is none.

    lerobot's handshake pings each motor once, so one status packet lost on a busy link fails the whole
    connect (`Missing motor IDs`); the connect is retried from a closed port before giving up.
    """
    if not device.calibration:
        raise CalibrationError(f"{device}: no calibration file {device.calibration_fpath}; run lerobot-calibrate first")
    for attempt in range(1, attempts + 1):
        try:
            device.connect(calibrate=False)
            if not device.is_calibrated:
                device.bus.write_calibration(device.calibration)
            return
        except (ConnectionError, TimeoutError, RuntimeError) as error:
            _close_quietly(device)
            if attempt == attempts:
                raise ConnectionError(f"{device}: could not connect after {attempts} attempts: {error}") from error
            logger.warning("%s: connect attempt %d failed (%s); retrying", device, attempt, str(error).splitlines()[0])


def disconnect_quietly(device: Robot | Teleoperator) -> None:
    """Disconnect at the end of a session; an arm that stopped answering (torque cannot be disabled) is
    reported and its port closed, so it cannot mask why the session ended."""
    try:
        device.disconnect()
    except (ConnectionError, TimeoutError, RuntimeError) as error:
        logger.warning("%s: disconnect failed (%s); port closed", device, str(error).splitlines()[0])
        _close_quietly(device)


def _close_quietly(device: Robot | Teleoperator) -> None:
    """Release whatever a failed connect left open, so the next attempt starts from scratch."""
    for camera in getattr(device, "cameras", {}).values():
        if camera.is_connected:
            camera.disconnect()
    if device.bus.is_connected:
        device.bus.port_handler.closePort()


def follower_limits(robot: Robot) -> JointLimits:
    """Calibrated joint limits of the follower, in its action order."""
    return limits_from_calibration(robot.calibration, {name: motor.norm_mode for name, motor in robot.bus.motors.items()})


def calibration_hash(arms: Sequence[ArmConfig]) -> str:
    """SHA-256 over the arms' calibration files: datasets record which calibration produced them."""
    digest = hashlib.sha256()
    for arm in arms:
        digest.update(calibration_file(arm).read_bytes())
    return digest.hexdigest()


def calibration_file(arm: ArmConfig) -> Path:
    return arm.calibration_dir / f"{arm.id}.json"
