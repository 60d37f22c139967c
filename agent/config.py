"""The agent's YAML configuration, parsed into dataclasses with one-line validation errors.

A config names the host, the arm pair (follower + leader), the cameras, where datasets live, the safety
envelope every follower target passes (`safety:`, zk0.hw.config.SafetySettings), how a policy is rolled
out (`rollout:`) and validated (`validation:`), when it lends itself to federated training (`idle:`,
zk0.agent.idle) and, on a host that joins a federation, its SuperNode settings (`federation:`, read by
`zk0 node`).
Every mistake a user can make in the file (unknown key, wrong type, missing device) is reported as
one `ConfigError` line that names the offending key, before anything is opened or written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from zk0.agent.control import DEFAULT_CONTROL_ADDRESS
from zk0.agent.idle import IdleSettings
from zk0.agent.policy_rules import parse_size
from zk0.hw.config import ArmConfig, CameraConfig, SafetySettings
from zk0.common.typed_yaml import ConfigError, build

DEFAULT_DATASETS_ROOT = Path("/var/lib/zk0/datasets")


@dataclass(frozen=True)
class RecordSettings:
    """Recording defaults; the CLI overrides episode and reset time."""

    fps: int = 30
    episode_time_s: float = 60.0
    reset_time_s: float = 10.0
    # An episode whose achieved frame rate falls below this fraction of `fps` is flagged in its metadata.
    min_rate_fraction: float = 0.95
    # Refuse to start an episode, or end the current one, when free disk space falls below this.
    min_free_disk_mb: int = 1024
    video_codec: str = "libsvtav1"
    # SVT-AV1 threads per camera stream (its `lp`): one is the least CPU per frame, and two streams still
    # encode 640x480 at 30 fps on two cores; null lets the codec start one per core.
    encoder_threads: int | None = 1
    # Extra attempts of each bus read (lerobot's `num_read_retries`): a lost status packet is routine
    # on a busy serial link and costs about a millisecond to retry.
    read_retries: int = 3
    # Ticks that still fail are dropped and counted; this many in a row means the hardware is gone:
    # the episode in progress is discarded and the session stops, committed episodes untouched.
    max_failed_ticks_in_row: int = 15
    # SCHED_FIFO priority (1-99) of the control loop while it runs, so encoders and other work never delay
    # a tick; null runs it at normal priority. Needs root, CAP_SYS_NICE or systemd's LimitRTPRIO.
    realtime_priority: int | None = 20
    # Seconds of video per camera that may wait for a busy encoder before the loop has to wait for it (late
    # ticks, counted; memory: fps x seconds x width x height x 3 bytes per camera at worst).
    encoder_buffer_s: float = 20.0


@dataclass(frozen=True)
class RolloutSettings:
    """How a policy drives the follower (zk0 rollout): what happens when actions stop coming, or on an estop."""

    watchdog_hold_s: float = 0.2  # no fresh action within this: hold position
    watchdog_torque_off_s: float = 1.0  # still none after this: torque off
    estop_hold_s: float = 0.5  # after an estop: hold this long, then torque off
    inference: Literal["sync", "rtc"] = "sync"  # one action chunk at a time, or real-time chunking
    # What computes the actions (rollout and validation): torch, or an ONNX export run by onnxruntime (made once
    # per policy and options, cached; zk0 policy export-onnx), with int8 weights and fewer Euler steps if asked.
    backend: Literal["torch", "onnxruntime"] = "torch"
    onnx_quantize: Literal["none", "int8"] = "none"
    onnx_steps: int | None = None  # denoising steps; null: the policy's own (10 for SmolVLA)

    def __post_init__(self) -> None:
        for name in ("watchdog_hold_s", "watchdog_torque_off_s", "estop_hold_s"):
            _require_positive(self, name)
        if self.backend == "onnxruntime" and self.inference == "rtc":
            raise ValueError("backend: onnxruntime cannot run rtc inference (its guidance differentiates the "
                             "denoiser with torch autograd); use inference: sync")
        if self.onnx_steps is not None and self.onnx_steps < 1:
            raise ValueError(f"onnx_steps: at least 1 (or null: the policy's own), got {self.onnx_steps}")
        if self.watchdog_hold_s >= self.watchdog_torque_off_s:
            raise ValueError(f"watchdog_hold_s: must be below watchdog_torque_off_s ({self.watchdog_torque_off_s}), "
                             f"got {self.watchdog_hold_s}")


@dataclass(frozen=True)
class ValidationSettings:
    """How a candidate policy is judged on this robot before it replaces the active one (zk0 validate)."""

    episodes: int = 20  # per policy, on the same seeds
    # A candidate is promoted only if its success rate is not below the active's by more than this.
    promotion_margin: float = 0.05
    max_episode_s: float = 20.0  # an episode not done by then is a failure
    tasks: list[str] = field(default_factory=list)  # empty: the policy's training tasks

    def __post_init__(self) -> None:
        _require_positive(self, "episodes")
        _require_positive(self, "max_episode_s")
        if not 0 <= self.promotion_margin < 1:
            raise ValueError(f"promotion_margin: must be in [0, 1), got {self.promotion_margin}")
        if any(not task.strip() for task in self.tasks):
            raise ValueError("tasks: task instructions must not be empty")


def _require_positive(settings: object, name: str) -> None:
    value = getattr(settings, name)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}: must be positive, got {value}")


@dataclass(frozen=True)
class FederationSettings:
    """This host's Flower SuperNode (`zk0 node`, see zk0.agent.node for how each setting is used)."""

    superlink: str  # the server's SuperLink, host:port
    datasets: list[str]  # dataset names under datasets_root, or absolute dataset roots
    policy_store: Path = Path("/var/lib/zk0/policies")  # where each round's global policy is saved
    root_certificates: Path | None = None  # the federation CA (from `zk0 certs`); required unless insecure
    auth_private_key: Path | None = None  # this node's SuperNode key; its .pub is registered on the server
    agent_address: str = ""  # the agent's control API (training lease); empty: train whenever asked
    device: str = "cpu"
    runtime_port: int | None = None  # local port the SuperNode serves its ClientApps on (Flower's default: none)
    insecure: bool = False  # plain-text gRPC: only for isolated test networks
    node_name: str = ""  # the name the server reports this node by; empty: the config's host_id
    # After each global policy arrives, the store keeps the newest `keep_versions` versions and then fits in
    # `max_policy_store` (e.g. "5G"); active and previous are never removed. null: no limit.
    keep_versions: int | None = 20
    max_policy_store: str | None = None

    def __post_init__(self) -> None:
        if not self.datasets:
            raise ValueError("datasets: a non-empty list of dataset names or roots")
        if self.keep_versions is not None and self.keep_versions < 1:
            raise ValueError(f"keep_versions: at least 1 (or null: keep every version), got {self.keep_versions}")
        if self.max_policy_store is not None:
            try:
                parse_size(self.max_policy_store)
            except ValueError as exc:
                raise ValueError(f"max_policy_store: {exc}") from None
        if not self.insecure and self.root_certificates is None:
            raise ValueError("root_certificates: required unless insecure is true")


@dataclass(frozen=True)
class AgentConfig:
    host_id: str
    robot_type: Literal["so100", "so101"]
    follower: ArmConfig
    leader: ArmConfig
    cameras: list[CameraConfig] = field(default_factory=list)
    datasets_root: Path = DEFAULT_DATASETS_ROOT
    record: RecordSettings = field(default_factory=RecordSettings)
    safety: SafetySettings = field(default_factory=SafetySettings)
    rollout: RolloutSettings = field(default_factory=RolloutSettings)
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    # Training hours, operator quiet time and resource guards under which the agent grants training leases.
    idle: IdleSettings = field(default_factory=IdleSettings)
    # ZeroMQ address of this host's control API (zk0ctl); ipc:// paths need a writable directory.
    control_address: str = DEFAULT_CONTROL_ADDRESS
    # This host's SuperNode settings (`zk0 node`); None: the host does not join a federation.
    federation: FederationSettings | None = None


def load_config(path: str | Path, check_devices: bool = True) -> AgentConfig:
    """Read and validate an agent config file. `check_devices` also requires ports and camera paths to exist."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    config = parse_config(raw, source=str(path))
    if check_devices:
        check_devices_present(config)
    return config


def parse_config(raw: Any, source: str = "config") -> AgentConfig:
    """Build an `AgentConfig` from already-loaded YAML data."""
    config = build(AgentConfig, raw, f"{source}: ")
    _check_values(config, source)
    return config


def check_devices_present(config: AgentConfig) -> None:
    """Fail on the first serial port, calibration file or camera device path that does not exist."""
    for role in ("follower", "leader"):
        arm: ArmConfig = getattr(config, role)
        if not Path(arm.port).exists():
            raise ConfigError(f"{role}.port: device {arm.port} not found (is the arm plugged in?)")
        calibration = arm.calibration_dir / f"{arm.id}.json"
        if not calibration.is_file():
            raise ConfigError(f"{role}.id: no calibration file {calibration} (calibrate with lerobot-calibrate)")
    for i, camera in enumerate(config.cameras):
        if camera.type == "opencv" and isinstance(camera.index_or_path, str) and not Path(camera.index_or_path).exists():
            raise ConfigError(f"cameras[{i}].index_or_path: device {camera.index_or_path} not found")


def _check_values(config: AgentConfig, source: str) -> None:
    names = [camera.name for camera in config.cameras]
    for i, camera in enumerate(config.cameras):
        if camera.type == "opencv" and camera.index_or_path is None:
            raise ConfigError(f"{source}: cameras[{i}].index_or_path: required for an opencv camera")
        if min(camera.width, camera.height, camera.fps) <= 0:
            raise ConfigError(f"{source}: cameras[{i}]: width, height and fps must be positive")
        if names.count(camera.name) > 1:
            raise ConfigError(f"{source}: cameras[{i}].name: duplicate camera name {camera.name!r}")
    record = config.record
    if record.fps <= 0 or record.episode_time_s <= 0 or record.reset_time_s < 0:
        raise ConfigError(f"{source}: record: fps and episode_time_s must be positive, reset_time_s not negative")
    if record.read_retries < 0 or record.max_failed_ticks_in_row < 1:
        raise ConfigError(f"{source}: record: read_retries must not be negative, max_failed_ticks_in_row at least 1")
    if not 0 < record.min_rate_fraction <= 1:
        raise ConfigError(f"{source}: record.min_rate_fraction: must be in (0, 1], got {record.min_rate_fraction}")
    if record.realtime_priority is not None and not 1 <= record.realtime_priority <= 99:
        raise ConfigError(f"{source}: record.realtime_priority: must be 1..99 or null, got {record.realtime_priority}")
    if record.encoder_buffer_s <= 0:
        raise ConfigError(f"{source}: record.encoder_buffer_s: must be positive, got {record.encoder_buffer_s}")
