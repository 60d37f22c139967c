"""What a host's hardware is: an arm on a Feetech bus, its cameras, and the safety envelope's settings, as
the agent config describes them.

The agent's YAML config (zk0.agent.config) is built from these; `zk0.hw.robots` turns them into lerobot
devices and `zk0.hw.safety.envelope_spec` into an envelope. They live here so that hardware code never
imports the agent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass(frozen=True)
class ArmConfig:
    """One arm on a Feetech bus: `id` names its calibration file `<calibration_dir>/<id>.json`."""

    port: str
    id: str
    calibration_dir: Path


@dataclass(frozen=True)
class CameraConfig:
    """One camera. `index_or_path` is an OpenCV index or device path; zmq cameras use `host`/`port`."""

    name: str
    type: Literal["opencv", "zmq"] = "opencv"
    width: int = 640
    height: int = 480
    fps: int = 30
    index_or_path: int | str | None = None
    host: str = "localhost"
    port: int = 5555


@dataclass(frozen=True)
class WorkspaceSettings:
    """A box (metres, world frame: x forward from the base, y robot-left, z up from the table) the gripper
    tip must stay inside."""

    lower: list[float]
    upper: list[float]

    def __post_init__(self) -> None:
        for name in ("lower", "upper"):
            corner = getattr(self, name)
            if len(corner) != 3 or not all(math.isfinite(v) for v in corner):
                raise ValueError(f"{name}: expected three finite numbers [x, y, z], got {corner}")
        if not all(lo < hi for lo, hi in zip(self.lower, self.upper, strict=True)):
            raise ValueError(f"lower: must be below upper on every axis, got {self.lower} and {self.upper}")


@dataclass(frozen=True)
class SafetySettings:
    """The safety envelope every follower target passes (see zk0.hw.safety), in real units per joint.

    Steps bound |target - present| per control tick (how hard a servo pulls); velocities bound how fast
    the target itself may move. The defaults let a human-paced leader (the sim's scripted operator
    reaches ~250 deg/s at its fastest) be followed closely; tighten them for a policy you do not trust.
    """

    max_step_deg: float = 10.0  # joints 1-5, degrees per tick
    max_gripper_step: float = 10.0  # gripper, percent of its range per tick
    max_velocity_deg_s: float = 180.0  # joints 1-5
    max_gripper_velocity: float = 200.0  # gripper, percent per second
    workspace: WorkspaceSettings | None = None  # null: no box

    def __post_init__(self) -> None:
        for name in ("max_step_deg", "max_gripper_step", "max_velocity_deg_s", "max_gripper_velocity"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: must be positive, got {value}")
