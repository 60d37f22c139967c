"""The simulated rig: world + follower bus + leader bus + cameras + scripted operator, in one process.

`zk0 sim rig` runs `Rig` and prints one JSON line (ports, addresses, calibration) before serving a
JSON REQ/REP control API; its client is zk0.hw.sim.rig_handle.RigHandle.

Threads in the rig process: one per arm bus (pty server), one stepping the world at `SIM_HZ` (the
operator places the leader's joints, the follower's present positions move the world), one rendering
and publishing the cameras, and the main thread answering control requests.
"""

from __future__ import annotations

import argparse
import json
import signal
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
