"""lerobot follower, leader and cameras built from zk0's hardware description (real ports or the sim rig's).

Arms connect with the calibration files the config names and never prompt. When the motors' EPROM
disagrees with the file, connecting is refused (`CalibrationError` naming the first motor and field that
differ): a file from another arm, or motors swapped or re-homed since, would make every joint reading and
limit wrong. `write_calibration=True` writes the file into the motors instead, which is what pressing
ENTER at lerobot's calibration prompt does; only do that for an arm whose file is known to be right.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lerobot.cameras import CameraConfig as LeRobotCameraConfig
from lerobot.cameras.opencv import OpenCVCameraConfig
from lerobot.cameras.zmq import ZMQCamera, ZMQCameraConfig
from lerobot.motors import MotorCalibration
from lerobot.motors.feetech import FeetechMotorsBus
from lerobot.robots import Robot
from lerobot.robots.so_follower import SOFollower, SOFollowerRobotConfig
from lerobot.teleoperators import Teleoperator
from lerobot.teleoperators.so_leader import SOLeader, SOLeaderTeleopConfig

from zk0.hw.config import ArmConfig, CameraConfig
from zk0.hw.safety import JointLimits, limits_from_calibration

logger = logging.getLogger(__name__)


class CalibrationError(RuntimeError):
    """An arm has no calibration file, or its file disagrees with the motors."""


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


def connect_without_prompt(
    device: Robot | Teleoperator, attempts: int = CONNECT_ATTEMPTS, write_calibration: bool = False
) -> None:
    """Connect an arm using its calibration file; raise `CalibrationError` if there is none, or if the
    motors disagree with it and `write_calibration` is false.

    The calibration is compared on the bare bus before lerobot's connect, which configures the motors and
    enables torque. lerobot's handshake pings each motor once, so one status packet lost on a busy link
    fails the whole connect (`Missing motor IDs`); the connect is retried from a closed port before giving up.
    """
    if not device.calibration:
        raise CalibrationError(f"{device}: no calibration file {device.calibration_fpath}; run lerobot-calibrate first")
    for attempt in range(1, attempts + 1):
        try:
            _settle_calibration(device, write_calibration)
            _connect(device)
            return
        except CalibrationError:
            raise
        except (ConnectionError, TimeoutError, RuntimeError) as error:
            _close_quietly(device)
            if attempt == attempts:
                raise ConnectionError(f"{device}: could not connect after {attempts} attempts: {error}") from error
            logger.warning("%s: connect attempt %d failed (%s); retrying", device, attempt, str(error).splitlines()[0])


def _connect(device: Robot | Teleoperator) -> None:
    """lerobot's `connect(calibrate=False)`, except that a ZMQ camera is ready at its first frame.

    lerobot's warmup reads each camera for a fixed `warmup_s` (1 s), one camera after the other: the time a camera
    sensor needs to settle its exposure. The frames of a stream server (lerobot's image server, the sim rig's
    cameras) need no settling, and those seconds were most of a recording's start."""
    cameras = getattr(device, "cameras", {}).values()
    streamed = [camera for camera in cameras if isinstance(camera, ZMQCamera)]
    if not streamed:
        device.connect(calibrate=False)
        return
    device.bus.connect()  # what SOFollower.connect does, with the stream cameras' warmup replaced
    with ThreadPoolExecutor(len(streamed), thread_name_prefix="zk0-camera-connect") as pool:
        list(pool.map(_connect_at_first_frame, streamed))  # together: each connect waits on its server, not the CPU
    for camera in cameras:
        if not isinstance(camera, ZMQCamera):
            camera.connect()
    device.configure()


def _connect_at_first_frame(camera: ZMQCamera) -> None:
    camera.connect(warmup=False)
    camera.async_read(timeout_ms=camera.timeout_ms)


def _settle_calibration(device: Robot | Teleoperator, write_calibration: bool) -> None:
    """Open the bus, compare the motors' calibration with the file, write the file if allowed, close."""
    bus = device.bus
    bus.connect(handshake=False)  # lerobot's connect below pings every motor
    try:
        difference = calibration_difference(device.calibration, read_motor_calibration(bus))
        if difference is None:
            return
        if not write_calibration:
            raise CalibrationError(
                f"{device}: calibration file {device.calibration_fpath} disagrees with the motors ({difference}); "
                "check that this is the right arm and file, recalibrate with lerobot-calibrate, or write the "
                "file into the motors (zk0 record --write-calibration)"
            )
        logger.warning("%s: writing %s into the motors (%s)", device, device.calibration_fpath, difference)
        bus.disable_torque()  # EPROM writes need torque off and the lock open
        bus.write_calibration(device.calibration)
    finally:
        bus.disconnect(disable_torque=False)


# The fields lerobot's `FeetechMotorsBus.is_calibrated` compares, in the order a difference is reported,
# and the registers holding them.
CALIBRATION_REGISTERS = {"homing_offset": "Homing_Offset", "range_min": "Min_Position_Limit", "range_max": "Max_Position_Limit"}
CALIBRATION_READ_RETRIES = 3
CALIBRATION_READ_ROUNDS = 4  # reads until two in a row agree
LATE_REPLY_WAIT_S = 0.05


def read_motor_calibration(bus: FeetechMotorsBus) -> dict[str, MotorCalibration]:
    """The calibration the motors' EPROM holds, read until two reads in a row agree.

    Each read is three sync reads with retries (lerobot's `read_calibration` reads every motor and field alone,
    and one lost reply fails it). A sync-read reply does not say which register it answers, so a late reply
    left on a busy or just-opened link can pass for the values asked for: one read alone must not decide that
    an arm disagrees with its file. Stale input is dropped before each read; reads that never agree twice
    raise ConnectionError (the connect is then retried from a closed port)."""
    previous = None
    for _ in range(CALIBRATION_READ_ROUNDS):
        values = {field: _fresh_sync_read(bus, register) for field, register in CALIBRATION_REGISTERS.items()}
        current = {
            motor: MotorCalibration(id=spec.id, drive_mode=0, **{field: int(values[field][motor]) for field in values})
            for motor, spec in bus.motors.items()
        }
        if current == previous:
            return current
        previous = current
    raise ConnectionError(f"the motors' calibration read back differently {CALIBRATION_READ_ROUNDS} times in a row")


def _fresh_sync_read(bus: FeetechMotorsBus, register: str) -> dict[str, int]:
    """One register of every motor, from replies sent after the request. lerobot's own retries re-read a port
    that may still receive the replies of the attempt that timed out, and accept them as the answer (each
    value then lands one register late); here every attempt drops what arrived before it."""
    for attempt in range(CALIBRATION_READ_RETRIES + 1):
        bus.port_handler.ser.reset_input_buffer()
        try:
            return bus.sync_read(register, normalize=False, num_retry=0)
        except ConnectionError:
            if attempt == CALIBRATION_READ_RETRIES:
                raise
            time.sleep(LATE_REPLY_WAIT_S)  # let late replies land, to be dropped by the next attempt


def calibration_difference(on_file: Mapping[str, MotorCalibration], on_motors: Mapping[str, MotorCalibration]) -> str | None:
    """The first motor and field where the file and the motors disagree, in the motors' order; None if none."""
    for motor, actual in on_motors.items():
        expected = on_file.get(motor)
        if expected is None:
            return f"{motor}: not in the file"
        for name in CALIBRATION_REGISTERS:
            if getattr(expected, name) != getattr(actual, name):
                return f"{motor}.{name}: {getattr(expected, name)} in the file, {getattr(actual, name)} on the motor"
    extra = sorted(set(on_file) - set(on_motors))
    return f"{extra[0]}: in the file but not on the bus" if extra else None


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


def arm_limits(arm: Robot | Teleoperator) -> JointLimits:
    """Calibrated joint limits of a follower or leader arm, in its action order."""
    return limits_from_calibration(arm.calibration, {name: motor.norm_mode for name, motor in arm.bus.motors.items()})


def calibration_hash(arms: Sequence[ArmConfig]) -> str:
    """SHA-256 over the arms' calibration files: datasets record which calibration produced them."""
    digest = hashlib.sha256()
    for arm in arms:
        digest.update(calibration_file(arm).read_bytes())
    return digest.hexdigest()


def calibration_file(arm: ArmConfig) -> Path:
    return arm.calibration_dir / f"{arm.id}.json"
