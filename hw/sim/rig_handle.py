"""The client of a simulated rig process (`zk0 sim rig`, zk0.hw.sim.rig), and an episode teleoperated through it.

`RigHandle.start(...)` launches the rig and is its client: lerobot's SO follower/leader and ZMQ cameras connect
to the ports it reports with nothing else changed. `RigHandle.attach(...)` is a client of a rig another process
keeps running (`zk0 agent --sim` starts one for all its jobs, as a real host's arms and cameras exist before any
job): closing it leaves the rig running.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

CONTROL_TIMEOUT_MS = 10_000
ATTACH_TIMEOUT_MS = 1_000  # a rig kept by another process that does not answer this fast is taken for gone


class RigError(RuntimeError):
    """The rig refused a request or did not answer."""


def rig_serves(info: dict[str, Any], robot: str, cameras: tuple[str, ...], fps: int, width: int, height: int) -> bool:
    """Whether the rig `info` describes is the one these `RigHandle.start` arguments would start."""
    served = [(c["name"], c["width"], c["height"]) for c in info["cameras"]]
    return (info["robot"], info["fps"], served) == (robot, fps, [(name, width, height) for name in cameras])


class RigHandle:
    """Client of a `zk0 sim rig` process: ports, lerobot configs, and the control API. It owns the process it
    started (`start`), and only its connection to one it attached to (`attach`)."""

    def __init__(self, process: subprocess.Popen | None, info: dict[str, Any]) -> None:
        self.process = process
        self.info = info
        self.follower_port: str = info["follower_port"]
        self.leader_port: str = info["leader_port"]
        self.calibration_dir = Path(info["calibration_dir"])
        self._socket = zmq.Context.instance().socket(zmq.REQ)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(info["control"])

    @classmethod
    def start(cls, robot: str = "so101", cameras: tuple[str, ...] = ("front", "wrist"), fps: int = 30,
              width: int = 320, height: int = 240, calibration_dir: Path | None = None, seed: int = 0,
              baudrate: int = 1_000_000, bus_trace: Path | None = None) -> RigHandle:
        """Launch `zk0 sim rig`; `bus_trace` names a file for its bus trace (see zk0.hw.sim.bus_trace)."""
        calibration_dir = Path(calibration_dir or Path("outputs") / "sim_calibration")
        command = [sys.executable, "-m", "zk0.cli", "sim", "rig", "--robot", robot,
                   "--calibration-dir", str(calibration_dir), "--cameras", ",".join(cameras), "--fps", str(fps),
                   "--width", str(width), "--height", str(height), "--seed", str(seed), "--baudrate", str(baudrate),
                   "--exit-with-stdin", *(["--bus-trace", str(bus_trace)] if bus_trace is not None else [])]
        # Its own session: a Ctrl-C meant for the caller (an estop, a save-and-stop) must not take the rig's
        # bus away first; the rig ends when its stdin closes, i.e. with its caller.
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                   start_new_session=True)
        line = process.stdout.readline()
        if not line:
            process.wait(timeout=10)
            raise RigError(f"zk0 sim rig exited ({process.returncode}) before describing itself")
        return cls(process, json.loads(line))

    @classmethod
    def attach(cls, description: Path, robot: str, cameras: tuple[str, ...], fps: int, width: int,
               height: int) -> RigHandle | None:
        """A client of the running rig whose `start` line (its JSON description) is in the file `description`, if
        that rig answers within a second and serves these arguments (`rig_serves`); None otherwise (no such file,
        a rig gone or built for another config), and the caller starts its own."""
        try:
            info = json.loads(description.read_text())
            if not rig_serves(info, robot, cameras, fps, width, height):
                return None
        except (OSError, ValueError, KeyError, TypeError):
            return None
        handle = cls(None, info)
        try:
            handle._ask("describe", {}, ATTACH_TIMEOUT_MS)
        except RigError:
            handle.close()
            return None
        return handle

    def request(self, command: str, **fields: Any) -> dict[str, Any]:
        return self._ask(command, fields, CONTROL_TIMEOUT_MS)

    def _ask(self, command: str, fields: dict[str, Any], timeout_ms: int) -> dict[str, Any]:
        self._socket.send_json({"cmd": command, **fields})
        if not self._socket.poll(timeout_ms):
            raise RigError(f"sim rig did not answer {command!r} within {timeout_ms} ms")
        reply = self._socket.recv_json()
        if not reply.get("ok"):
            raise RigError(reply.get("error", f"sim rig refused {command!r}"))
        return reply

    def reset(self, task: str, seed: int) -> dict[str, Any]:
        return self.request("reset", task=task, seed=seed)["snapshot"]

    def start_operator(self) -> None:
        self.request("start_operator")

    def stop_operator(self) -> None:
        self.request("stop_operator")

    def snapshot(self) -> dict[str, Any]:
        return self.request("snapshot")["snapshot"]

    def success(self) -> bool:
        return bool(self.request("success")["success"])

    def inject_faults(self, arm: str, **plan: Any) -> None:
        """E.g. `inject_faults("follower", drop_next=2, error_bits={3: ERRBIT_OVERLOAD})`."""
        self.request("faults", arm=arm, plan=plan)

    def camera_configs(self) -> dict[str, Any]:
        """lerobot `ZMQCameraConfig`s for the rig's cameras, keyed by camera name."""
        from lerobot.cameras.zmq import ZMQCameraConfig

        return {
            camera["name"]: ZMQCameraConfig(
                server_address=self.info["camera_host"], port=self.info["camera_port"], camera_name=camera["name"],
                width=camera["width"], height=camera["height"], fps=self.info["fps"],
            )
            for camera in self.info["cameras"]
        }

    def follower_config(self, with_cameras: bool = True) -> Any:
        """lerobot `so10x_follower` config for the simulated follower (cameras attached by default)."""
        from lerobot.robots import RobotConfig, so_follower  # noqa: F401  (registers the so10x types)

        config_class = RobotConfig.get_choice_class(f"{self.info['robot']}_follower")
        cameras = self.camera_configs() if with_cameras else {}
        return config_class(port=self.follower_port, id=self.info["follower_id"],
                            calibration_dir=self.calibration_dir, cameras=cameras)

    def leader_config(self) -> Any:
        """lerobot `so10x_leader` config for the simulated leader."""
        from lerobot.teleoperators import TeleoperatorConfig, so_leader  # noqa: F401

        config_class = TeleoperatorConfig.get_choice_class(f"{self.info['robot']}_leader")
        return config_class(port=self.leader_port, id=self.info["leader_id"], calibration_dir=self.calibration_dir)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                self.request("shutdown")
            except RigError:
                self.process.terminate()
            self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._socket.close()

    def __enter__(self) -> RigHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class EpisodeResult:
    success: bool
    steps: int
    duration_s: float
    observation: dict[str, Any]


def teleoperate_episode(rig: RigHandle, robot: Any, teleop: Any, task: str, seed: int, fps: int = 30,
                        timeout_s: float = 30.0) -> EpisodeResult:
    """One episode the way a person records it: the scripted operator moves the leader, and lerobot copies
    `teleop.get_action()` to `robot.send_action()` at `fps` until the operator is done (or `timeout_s`)."""
    rig.reset(task, seed)
    rig.start_operator()
    period = 1.0 / fps
    started = time.monotonic()
    steps, observation = 0, {}
    while time.monotonic() - started < timeout_s:
        tick = time.monotonic()
        robot.send_action(teleop.get_action())
        observation = robot.get_observation()
        steps += 1
        if steps % fps == 0 and rig.snapshot()["operator"]["done"]:
            break
        time.sleep(max(0.0, period - (time.monotonic() - tick)))
    rig.stop_operator()
    return EpisodeResult(rig.success(), steps, time.monotonic() - started, observation)
