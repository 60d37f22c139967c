"""The simulated rig: world + follower bus + leader bus + cameras + scripted operator, in one process.

`zk0 sim rig` runs `Rig` and prints one JSON line (ports, addresses, calibration) before serving a
JSON REQ/REP control API. `RigHandle.start(...)` launches that process and is the client: lerobot's
SO follower/leader and ZMQ cameras connect to the ports it reports with nothing else changed.
`RigHandle.attach(...)` is a client of a rig another process keeps running (`zk0 agent --sim` starts one for
all its jobs, as a real host's arms and cameras exist before any job): closing it leaves the rig running.

Threads in the rig process: one per arm bus (pty server), one stepping the world at `SIM_HZ` (the
operator places the leader's joints, the follower's present positions move the world), one rendering
and publishing the cameras, and the main thread answering control requests.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from zk0.hw.realtime import make_realtime
from zk0.hw.sim.bus_trace import BusTrace
from zk0.hw.sim.calibration import (
    ROBOTS,
    arm_calibration,
    calibrated_arm_bus,
    joints_to_ticks,
    ticks_to_joints,
    write_calibration_file,
)
from zk0.hw.sim.cameras import CameraPublisher, CameraSpec
from zk0.hw.sim.feetech import FaultPlan
from zk0.hw.sim.operator import ScriptedOperator
from zk0.hw.sim.pty_bus import SIM_BUS_PRIORITY, LinkConfig, PtyBusServer
from zk0.hw.sim.world import World

SIM_HZ = 100
FOLLOWER_ID = "sim_follower"
LEADER_ID = "sim_leader"
# Both arms start each episode at mid-range with the gripper closed; the operator starts from wherever
# the follower is.
HOME_JOINTS = np.zeros(6)
CONTROL_TIMEOUT_MS = 10_000
ATTACH_TIMEOUT_MS = 1_000  # a rig kept by another process that does not answer this fast is taken for gone


# The joints the table can stop (zk0.hw.sim.world.stop_at_table moves only these).
TABLE_STALLED = ("shoulder_lift", "elbow_flex", "wrist_flex")


def stall_at_table(bus: Any, calibration: Mapping[str, Any], joints: np.ndarray) -> None:
    """Put the lift/elbow/wrist shafts where the world stopped the arm on the table, at rest (their goals stay:
    the servos keep pushing); the other joints move freely and keep their own motion. The real-time rig and the
    lock-step sim both call it, so a stalled arm reads the same in both."""
    ticks = joints_to_ticks(joints, calibration)
    with bus.lock:
        for name in TABLE_STALLED:
            servo_id = calibration[name].id
            bus.servos[servo_id].place(ticks[servo_id])


@dataclass(frozen=True)
class RigConfig:
    robot: str = "so101"
    calibration_dir: Path = Path("outputs/sim_calibration")
    cameras: tuple[CameraSpec, ...] = (CameraSpec("front"), CameraSpec("wrist"))
    fps: int = 30
    seed: int = 0
    link: LinkConfig = field(default_factory=LinkConfig)
    bus_trace: Path | None = None  # JSON-lines trace of both arms' Goal_Position/Torque_Enable writes

    def __post_init__(self) -> None:
        if self.robot not in ROBOTS:
            raise ValueError(f"unknown robot {self.robot!r}; expected one of {ROBOTS}")


class Rig:
    """The rig's state and behaviour; `handle` answers one control request."""

    def __init__(self, config: RigConfig) -> None:
        self.config = config
        self.world = World(robot=config.robot, seed=config.seed)
        self.follower = calibrated_arm_bus("follower", HOME_JOINTS, seed=config.seed)
        self.leader = calibrated_arm_bus("leader", HOME_JOINTS, seed=config.seed + 1)
        self._calibration = {"follower": arm_calibration("follower"), "leader": arm_calibration("leader")}
        write_calibration_file(config.calibration_dir, FOLLOWER_ID, "follower")
        write_calibration_file(config.calibration_dir, LEADER_ID, "leader")
        self._lock = threading.Lock()
        self._operator: ScriptedOperator | None = None
        self._operator_t0: float | None = None  # when the operator's clock read 0; None while it is stopped
        self._operator_elapsed = 0.0  # the operator's clock when it was last stopped
        self.follower_server = PtyBusServer(self.follower, config.link)
        self.leader_server = PtyBusServer(self.leader, config.link)
        self.cameras = CameraPublisher(config.cameras)
        self._stop = threading.Event()
        self._stepper = threading.Thread(target=self._step_loop, name="sim-world", daemon=True)
        self.reset(self.world.task.name, config.seed)
        self._trace = None if config.bus_trace is None else BusTrace(config.bus_trace)
        if self._trace is not None:
            self.follower.write_observer = self._trace.observer("follower")
            self.leader.write_observer = self._trace.observer("leader")

    def start(self) -> Rig:
        self.follower_server.start()
        self.leader_server.start()
        self.cameras.start()
        self._stepper.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._stepper.join(timeout=2.0)
        self.cameras.stop()
        self.follower_server.stop()
        self.leader_server.stop()
        if self._trace is not None:
            self._trace.close()

    def describe(self) -> dict[str, Any]:
        return {
            "robot": self.config.robot,
            "follower_port": self.follower_server.port,
            "leader_port": self.leader_server.port,
            "follower_id": FOLLOWER_ID,
            "leader_id": LEADER_ID,
            "calibration_dir": str(Path(self.config.calibration_dir).resolve()),
            "camera_host": self.cameras.host,
            "camera_port": self.cameras.port,
            "cameras": [asdict(c) for c in self.config.cameras],
            "fps": self.config.fps,
            "bus_trace": None if self.config.bus_trace is None else str(Path(self.config.bus_trace).resolve()),
        }

    # -- simulation -------------------------------------------------------------------------------------
    def _step_loop(self) -> None:
        period, frame_period = 1.0 / SIM_HZ, 1.0 / self.config.fps
        last = next_frame = time.monotonic()
        while not self._stop.wait(period):
            now = time.monotonic()
            self.step(now, now - last)
            last = now
            if now >= next_frame:
                with self._lock:
                    self.cameras.publish(self.world)
                next_frame = max(next_frame + frame_period, now)

    def step(self, now: float, dt: float) -> None:
        with self._lock:
            if self._operator is not None and self._operator_t0 is not None:
                joints = self._operator.leader_joints(now - self._operator_t0, self.world)
                self.leader.place(joints_to_ticks(joints, self._calibration["leader"]))
            self.follower.advance(now)
            self.leader.advance(now)
            follower_joints = ticks_to_joints(self.follower.positions(), self._calibration["follower"])
            self.world.step(follower_joints, dt)
            if self.world.pressing_table:  # the servos read where the table stopped the arm, as in lock-step
                stall_at_table(self.follower, self._calibration["follower"], self.world.joints)

    # -- control ----------------------------------------------------------------------------------------
    def reset(self, task: str, seed: int) -> None:
        with self._lock:
            self.world.reset(task, seed)
            self.follower.teleport(joints_to_ticks(HOME_JOINTS, self._calibration["follower"]))
            self.leader.teleport(joints_to_ticks(HOME_JOINTS, self._calibration["leader"]))
            self.world.step(ticks_to_joints(self.follower.positions(), self._calibration["follower"]), 0.0)
            self._operator = ScriptedOperator(self.world.task, seed, robot=self.config.robot)
            self._operator_t0 = None
            self._operator_elapsed = 0.0

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            state = self.world.snapshot()
            if self._operator is not None:
                t = self._operator_elapsed if self._operator_t0 is None else time.monotonic() - self._operator_t0
                state["operator"] = {"running": self._operator_t0 is not None, "phase": self._operator.phase,
                                     "done": bool(self._operator.done(t, self.world)), "t": round(t, 3)}
            return state

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        command = request.get("cmd")
        if command == "reset":
            self.reset(str(request["task"]), int(request.get("seed", 0)))
            return {"ok": True, "snapshot": self.snapshot()}
        # Stopping pauses the operator's clock and starting continues it, so an operator who hands the arm back
        # to a policy mid-episode (DAgger) picks up the plan where they left it; `reset` starts a fresh plan.
        if command == "start_operator":
            with self._lock:
                if self._operator_t0 is None:
                    self._operator_t0 = time.monotonic() - self._operator_elapsed
            return {"ok": True}
        if command == "stop_operator":
            with self._lock:
                if self._operator_t0 is not None:
                    self._operator_elapsed = time.monotonic() - self._operator_t0
                self._operator_t0 = None
            return {"ok": True}
        if command == "snapshot":
            return {"ok": True, "snapshot": self.snapshot()}
        if command == "success":
            with self._lock:
                return {"ok": True, "success": self.world.success()}
        if command == "faults":
            bus = {"follower": self.follower, "leader": self.leader}[request["arm"]]
            plan = FaultPlan.from_dict(request.get("plan", {}))
            with bus.lock:
                bus.faults = plan
            return {"ok": True}
        if command == "describe":
            return {"ok": True, **self.describe()}
        raise ValueError(f"unknown rig command {command!r}")


def serve_rig(args: argparse.Namespace) -> int:
    """`zk0 sim rig`: run the rig until SIGTERM/SIGINT or a `shutdown` request."""
    from zk0.hw.sim.cli import link_config

    names = [name.strip() for name in args.cameras.split(",") if name.strip()]
    config = RigConfig(
        robot=args.robot, calibration_dir=args.calibration_dir, fps=args.fps, seed=args.seed,
        cameras=tuple(CameraSpec(name, args.width, args.height) for name in names), link=link_config(args),
        bus_trace=args.bus_trace,
    )
    # Short GIL slices: a bus thread waiting to answer must not sit behind the world stepper for 5 ms.
    sys.setswitchinterval(0.0005)
    rig = Rig(config).start()
    # The bus threads answer at real-time priority, but they need the GIL from the world stepper and the
    # control thread: those must not be preempted by the host's other work either.
    make_realtime(SIM_BUS_PRIORITY)
    control = zmq.Context.instance().socket(zmq.REP)
    control.setsockopt(zmq.LINGER, 0)
    control.bind("tcp://127.0.0.1:0")
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    if args.exit_with_stdin:
        threading.Thread(target=_stop_at_stdin_eof, args=(stopping,), daemon=True).start()
    print(json.dumps({**rig.describe(), "control": control.getsockopt_string(zmq.LAST_ENDPOINT)}), flush=True)
    try:
        while not stopping.is_set():
            if not control.poll(100):
                continue
            request = control.recv_json()
            if request.get("cmd") == "shutdown":
                control.send_json({"ok": True})
                break
            try:
                reply = rig.handle(request)
            except (KeyError, ValueError, TypeError) as error:
                reply = {"ok": False, "error": f"{type(error).__name__}: {error}"}
            control.send_string(json.dumps(reply, default=_json_scalar))
    finally:
        control.close()
        rig.stop()
    return 0


def _json_scalar(value: Any) -> Any:
    """numpy scalars and arrays in world snapshots become plain JSON numbers and lists."""
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _stop_at_stdin_eof(stopping: threading.Event) -> None:
    # The parent holds our stdin open; EOF means it is gone, so a crashed recorder never orphans a rig.
    for _ in sys.stdin:
        pass
    stopping.set()


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
