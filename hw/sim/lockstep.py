"""The simulated arm in lock-step: one control tick of simulated time per command, no wall clock.

The rig (rig.py) runs the world in real time behind real ptys and ZMQ cameras, which is what recording needs.
Judging a policy needs the opposite: the same (task, seed, policy) must give the same episode however loaded
the machine is, so here the caller advances the world explicitly. What the follower does with a command is
still the servo's: each tick the goal is written in ticks (as lerobot's `sync_write("Goal_Position")` would,
clamped to the calibrated range and rounded) and the STS3215 motion model (`feetech.step_toward`, with the
acceleration lerobot configures on connect) moves the shaft, in sub-steps at the rig's `SIM_HZ` so the grasp
model sees the jaws close as it does in the rig. Cameras are the rig's renderers at the sizes asked for.
When the table stops the arm (`World.step`), the stalled servos' shafts are where the world left them, so
the present position a controller reads is the arm resting on the table, not the goal it cannot reach.

Each `reset` builds a fresh world and bus, so an episode depends on (task, seed) only, never on which
episodes ran before on this object.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from zk0.hw.sim.calibration import (
    GRIPPER,
    MOTOR_NAMES,
    arm_calibration,
    calibrated_arm_bus,
    joints_to_ticks,
    ticks_to_joints,
)
from zk0.hw.sim.operator import ScriptedOperator
from zk0.hw.sim.render import CameraRenderer
from zk0.hw.sim.rig import HOME_JOINTS, SIM_HZ, stall_at_table
from zk0.hw.sim.tasks import Task
from zk0.hw.sim.world import World

# What lerobot writes to each follower servo on connect (`FeetechMotorsBus.configure_motors`, then torque on):
# of these only the acceleration and torque registers change how the motion model moves the shaft.
LEROBOT_CONNECT_REGISTERS: dict[str, int] = {
    "Return_Delay_Time": 0,
    "Maximum_Acceleration": 254,
    "Acceleration": 254,
    "Torque_Enable": 1,
}


@dataclass(frozen=True)
class Observation:
    """What a controller sees at the start of a tick: episode time, present joints (normalized units), images."""

    t: float
    joints: np.ndarray
    images: dict[str, np.ndarray]


class LockstepSim:
    """World + follower servos + cameras, advanced one control tick at a time by `step`."""

    def __init__(self, cameras: Mapping[str, tuple[int, int]], fps: int, robot: str = "so101") -> None:
        """`cameras`: name -> (width, height) of each image a controller needs (front, top, wrist)."""
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.fps, self.robot = int(fps), robot
        self.renderers = {name: CameraRenderer(name, width, height) for name, (width, height) in cameras.items()}
        self.substeps = max(1, math.ceil(SIM_HZ / self.fps))
        self._calibration = arm_calibration("follower")
        self.world = World(robot=robot)
        self.ticks = 0

    def reset(self, task: str, seed: int) -> None:
        """Start an episode from the rig's home pose with the scene of (task, seed)."""
        self.world = World(task, seed, robot=self.robot)
        self.bus = calibrated_arm_bus("follower", HOME_JOINTS, seed=seed)
        with self.bus.lock:
            for servo in self.bus.servos.values():
                for name, value in LEROBOT_CONNECT_REGISTERS.items():
                    servo.set(name, value)
        self._time = 0.0
        self.bus.advance(self._time)
        self.world.step(self.present(), 0.0)
        self.ticks = 0
        self.table_contact_ticks = 0  # ticks during which the arm pressed into the table

    @property
    def t(self) -> float:
        """Simulated seconds since `reset`."""
        return self.ticks / self.fps

    def present(self) -> np.ndarray:
        """Present follower joints as lerobot reads them (normalized units)."""
        ticks = {servo_id: float(round(position)) for servo_id, position in self.bus.positions().items()}
        return ticks_to_joints(ticks, self._calibration)

    def observe(self) -> Observation:
        return Observation(self.t, self.present(), {name: r.render(self.world) for name, r in self.renderers.items()})

    def step(self, goal: np.ndarray) -> None:
        """Write `goal` (normalized joints) as the servos' goal positions, then advance one control tick."""
        ticks = joints_to_ticks(np.asarray(goal, dtype=float), self._calibration)
        with self.bus.lock:
            for servo_id, value in ticks.items():
                self.bus.servos[servo_id].set("Goal_Position", int(round(value)))
        dt = 1.0 / (self.fps * self.substeps)
        pressed = False
        for _ in range(self.substeps):
            self._time += dt
            self.bus.advance(self._time)
            self.world.step(ticks_to_joints(self.bus.positions(), self._calibration), dt)
            if self.world.pressing_table:
                pressed = True
                stall_at_table(self.bus, self._calibration, self.world.joints)
        self.table_contact_ticks += pressed
        self.ticks += 1

    def success(self) -> bool:
        return self.world.success()


class OperatorController:
    """The scripted operator as a lock-step controller (zk0.agent.lockstep's protocol): its leader joints
    are the target. It reads the world directly (privileged), so it shows what the tasks and the loop
    allow and records demonstrations; it is never a policy under validation."""

    def __init__(self, sim: LockstepSim) -> None:
        self.sim = sim
        self.operator: ScriptedOperator | None = None

    def reset(self, task: Task, seed: int) -> None:
        self.operator = ScriptedOperator(task, seed, robot=self.sim.robot)

    def act(self, observation: Observation) -> np.ndarray:
        return self.operator.leader_joints(observation.t, self.sim.world)


def follower_limits() -> Any:
    """The simulated follower's calibrated joint limits (zk0.hw.safety.JointLimits), as lerobot normalizes
    them with `use_degrees=True`; imported lazily because lerobot pulls in torch."""
    from lerobot.motors import MotorCalibration, MotorNormMode

    from zk0.hw.safety import limits_from_calibration

    calibration = {name: MotorCalibration(**asdict(joint)) for name, joint in arm_calibration("follower").items()}
    modes = {name: MotorNormMode.RANGE_0_100 if name == GRIPPER else MotorNormMode.DEGREES for name in MOTOR_NAMES}
    return limits_from_calibration(calibration, modes)
