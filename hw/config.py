"""What a host's hardware is: an arm on a Feetech bus and its cameras, as the agent config describes them.

The agent's YAML config (zk0.agent.config) is built from these; `zk0.hw.robots` turns them into lerobot
devices. They live here so that hardware code never imports the agent.
"""

from __future__ import annotations

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
