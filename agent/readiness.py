"""Is the robot there? The check `zk0 agent` runs before it tells systemd READY=1.

READY means an operator can start a recording now, so the agent first proves that the hardware its jobs will
open answers: every motor id of the follower and the leader answers a Feetech ping with the model number the
arm's motor table expects, and every configured camera delivers one frame. Nothing stays open: each bus and
camera is opened and closed again, as the jobs own them afterwards (zk0.agent.daemon_jobs). With `--sim` the
check runs against the simulated rig the agent keeps for its jobs, through the same code.

The check runs in a child process (`python -m zk0.agent.readiness HARDWARE-JSON`, printing its problems as
JSON) with a hard timeout: a serial adapter or a V4L2 driver that hangs in open() cannot hang the agent, no
device handle or reader thread is left in the long-lived daemon, and the agent never imports lerobot.

Deciding what a result means is pure (`arm_problem`, `decide`): a failed check is reported (STATUS=, the
log) and retried every RETRY_S; after GIVE_UP_S the agent exits non-zero, before the unit's TimeoutStartSec
(3 min) would kill it, so the journal ends with the agent's reason and systemd restarts it with backoff.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from zk0.hw.config import ArmConfig, CameraConfig

PING_ATTEMPTS = 3  # per motor: a status packet lost, or late, on a busy or just-opened link is routine
CAMERA_TIMEOUT_MS = 5000  # a first frame: a USB camera's open plus its first exposure, or a stream's next frame
# The whole child: its imports (torch's, through lerobot: seconds on a loaded host), 12 motors x 3 pings x the
# SDK's ~35 ms reply timeout (and a 50 ms wait before each retry) at worst, then up to CAMERA_TIMEOUT_MS per camera.
PROBE_TIMEOUT_S = 45.0
RETRY_S = 5.0
GIVE_UP_S = 120.0  # the last try starts by then and ends within PROBE_TIMEOUT_S: inside TimeoutStartSec=3min
WAKE_S = 0.1  # how often a running check looks at the agent's stop flag (SIGTERM during startup)


@dataclass(frozen=True)
class Hardware:
    """What the agent's jobs will open: both arms' buses and the follower's cameras."""

    follower: ArmConfig
    leader: ArmConfig
    cameras: tuple[CameraConfig, ...]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), default=str)

    @classmethod
    def from_json(cls, text: str) -> Hardware:
        raw = json.loads(text)
        return cls(_arm(raw["follower"]), _arm(raw["leader"]), tuple(CameraConfig(**c) for c in raw["cameras"]))


def _arm(spec: Mapping[str, Any]) -> ArmConfig:
    return ArmConfig(spec["port"], spec["id"], Path(spec["calibration_dir"]))


def config_hardware(config: Any) -> Hardware:
    """The hardware an agent config names (zk0.agent.config.AgentConfig)."""
    return Hardware(config.follower, config.leader, tuple(config.cameras))


def rig_hardware(info: Mapping[str, Any]) -> Hardware:
    """The hardware a simulated rig serves, from its description (its JSON `start` line, zk0.hw.sim.rig): the
    ports, cameras and calibration its jobs are pointed at (zk0.agent.record_cli)."""
    calibration = Path(info["calibration_dir"])
    cameras = tuple(CameraConfig(name=c["name"], type="zmq", width=c["width"], height=c["height"], fps=info["fps"],
                                 host=info["camera_host"], port=info["camera_port"]) for c in info["cameras"])
    return Hardware(ArmConfig(info["follower_port"], info["follower_id"], calibration),
                    ArmConfig(info["leader_port"], info["leader_id"], calibration), cameras)


# -- what a result means (pure) ----------------------------------------------------------------------------------
def arm_problem(role: str, port: str, motors: Mapping[str, tuple[int, int]],
                found: Mapping[str, int | None]) -> str | None:
    """What is wrong with an arm whose `motors` (name -> (id, expected model number)) answered pings with the
    model numbers in `found` (None: no valid answer); None when every motor answered as expected."""
    silent = [f"{name} (id {motors[name][0]})" for name in motors if found.get(name) is None]
    wrong = [f"{name} (id {motor_id}) is model {found[name]}, expected {model}"
             for name, (motor_id, model) in motors.items() if found.get(name) not in (None, model)]
    if not silent and not wrong:
        return None
    parts = ([f"no answer from {', '.join(silent)}"] if silent else []) + wrong
    if len(silent) == len(motors):
        parts = ["no motor answers (powered? the right port?)"]
    return f"{role} arm on {port}: {'; '.join(parts)}"


@dataclass(frozen=True)
class Decision:
    action: Literal["ready", "retry", "give-up"]
    reason: str
    retry_in_s: float = 0.0


def decide(problems: Sequence[str], elapsed_s: float, give_up_s: float = GIVE_UP_S,
           retry_s: float = RETRY_S) -> Decision:
    """Ready when nothing is wrong; else retry in `retry_s`, unless `elapsed_s` since the first try leaves no
    time for another before `give_up_s`."""
    if not problems:
        return Decision("ready", "robot and cameras answer")
    reason = "; ".join(problems)
    if elapsed_s + retry_s > give_up_s:
        return Decision("give-up", f"{reason} (still failing after {elapsed_s:.0f} s)")
    return Decision("retry", f"{reason}; retrying in {retry_s:.0f} s", retry_s)


def wait_until_ready(attempt: Callable[[], Sequence[str]], report: Callable[[Decision], object],
                     stop: threading.Event, clock: Callable[[], float] = time.monotonic,
                     give_up_s: float = GIVE_UP_S, retry_s: float = RETRY_S) -> Decision | None:
    """Run `attempt` (the problems it found) until the hardware answers or it is time to give up; `report` hears
    every decision. The last decision, or None once `stop` is set (SIGTERM while starting)."""
    started = clock()
    while not stop.is_set():
        decision = decide(attempt(), clock() - started, give_up_s, retry_s)
        if stop.is_set():
            return None
        report(decision)
        if decision.action != "retry":
            return decision
        if stop.wait(decision.retry_in_s):
            return None
    return None


# -- the agent's side: the check as a child process ------------------------------------------------------------
def run_probe(hardware: Hardware, stop: threading.Event, env: Mapping[str, str],
              timeout_s: float = PROBE_TIMEOUT_S) -> list[str]:
    """The problems the check finds, from a child process given `timeout_s`; it is killed once `stop` is set."""
    process = subprocess.Popen([sys.executable, "-m", "zk0.agent.readiness", hardware.to_json()],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(env))
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            out, err = process.communicate(timeout=WAKE_S)
            break
        except subprocess.TimeoutExpired:
            if stop.is_set() or time.monotonic() >= deadline:
                process.kill()
                process.communicate()
                if stop.is_set():
                    return ["stopping"]
                return [f"the hardware check did not finish within {timeout_s:.0f} s"]
    try:
        return [str(p) for p in json.loads(out.strip().splitlines()[-1])["problems"]]
    except (IndexError, ValueError, KeyError, TypeError):
        last = (err.strip().splitlines() or ["no output"])[-1]
        return [f"the hardware check failed (exit status {process.returncode}): {last}"]


# -- the child: open, ask, close -------------------------------------------------------------------------------
def probe(hardware: Hardware, camera_timeout_ms: int = CAMERA_TIMEOUT_MS) -> list[str]:
    """Every problem found: arms first (a camera of the follower is useless without it), then each camera."""
    from zk0.hw.robots import make_follower, make_leader

    arms = (("follower", make_follower(hardware.follower, (), read_retries=0)),  # pings only: no reads
            ("leader", make_leader(hardware.leader, read_retries=0)))
    problems = [problem for role, device in arms if (problem := probe_arm(role, device.bus)) is not None]
    problems += [problem for camera in hardware.cameras if (problem := probe_camera(camera, camera_timeout_ms))]
    return problems


def probe_arm(role: str, bus: Any) -> str | None:
    """Ping every motor of a lerobot Feetech `bus` (closed before and after), without touching torque."""
    try:
        bus.connect(handshake=False)
    except (ConnectionError, OSError) as error:
        return f"{role} arm: cannot open {bus.port} ({_first_line(error)})"
    try:
        found = {name: _ping(bus, motor.id) for name, motor in bus.motors.items()}
    finally:
        bus.port_handler.closePort()
    motors = {name: (motor.id, bus.model_number_table[motor.model]) for name, motor in bus.motors.items()}
    return arm_problem(role, bus.port, motors, found)


def _ping(bus: Any, motor_id: int) -> int | None:
    """The model number motor `motor_id` answers with, None if it does not within PING_ATTEMPTS pings. Before each
    ping the input is drained, after a wait for late replies to land: lerobot's own retries do neither, so a reply
    that came after its timeout would answer the next ping (as in zk0.hw.robots's calibration reads)."""
    from zk0.hw.robots import LATE_REPLY_WAIT_S

    for attempt in range(PING_ATTEMPTS):
        if attempt:
            time.sleep(LATE_REPLY_WAIT_S)
        bus.port_handler.ser.reset_input_buffer()
        try:
            model = bus.ping(motor_id)
        except (ConnectionError, RuntimeError, IndexError, OSError):  # IndexError: the SDK parsing a short reply
            model = None
        if model is not None:
            return model
    return None


def probe_camera(camera: CameraConfig, timeout_ms: int = CAMERA_TIMEOUT_MS) -> str | None:
    """Open the camera, wait up to `timeout_ms` for one frame, close it."""
    from lerobot.cameras.utils import make_cameras_from_configs

    from zk0.hw.robots import camera_config

    config = camera_config(camera)
    if hasattr(config, "timeout_ms"):  # a stream camera's own read timeout, else its reader outlives the wait
        config = dataclasses.replace(config, timeout_ms=timeout_ms)
    device = make_cameras_from_configs({camera.name: config})[camera.name]
    try:
        device.connect(warmup=False)
        frame = device.async_read(timeout_ms=timeout_ms)
    except (ConnectionError, TimeoutError, RuntimeError, OSError) as error:
        return f"camera {camera.name}: no frame ({_first_line(error)})"
    finally:
        if device.is_connected:
            device.disconnect()
    return None if frame is not None and frame.size else f"camera {camera.name}: an empty frame"


def _first_line(error: BaseException) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    print(json.dumps({"problems": probe(Hardware.from_json(args[0]))}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
