"""The simulated tabletop: arm pose from the follower's joints, cubes, bin, and a kinematic grasp/push model.

Physics is deliberately kinematic: a cube between closing jaws attaches and rides with the gripper, opening
the jaws lets it fall (onto the table or the bin floor), and a closed gripper tip pushes resting cubes out of
its way. That is enough for the pick-place and push tasks in tasks.py and keeps a step well under a
millisecond.
"""

from __future__ import annotations

import numpy as np

from zk0.hw import kinematics
from zk0.hw.kinematics import ArmGeometry, ArmPose
from zk0.hw.sim.tasks import Cube, Scene, Task, get_task

GRAVITY = 9.81
# A cube attaches when the jaws close to within this of its width, having been wider on the previous step.
GRIP_MARGIN = 0.003
# ...and drops once they open this much wider than the cube.
RELEASE_MARGIN = 0.006
# How far the cube centre may sit from the jaw pads and still be caught (gripper frame: approach, up).
GRASP_TOLERANCE_APPROACH = 0.016
GRASP_TOLERANCE_UP = 0.016
# The gripper pushes only when the jaws are nearly closed; the tip then acts as a disc of this radius.
PUSH_MAX_GAP = 0.03
PUSH_TIP_RADIUS = 0.012


class World:
    """One episode's world. ``reset`` places objects from (task, seed); ``step`` advances with follower joints."""

    def __init__(self, task: str | Task = "pick_place_red", seed: int = 0, robot: str = "so101") -> None:
        self.geometry: ArmGeometry = kinematics.geometry_for(robot)
        self.reset(task, seed)

    def reset(self, task: str | Task, seed: int) -> None:
        """Start an episode: same (task, seed) gives the same placement. The arm keeps its last joints."""
        self.task: Task = task if isinstance(task, Task) else get_task(task)
        self.seed = int(seed)
        self.scene: Scene = self.task.place(np.random.default_rng(self.seed))
        self.time = 0.0
        self.held: str | None = None
        self._held_offset = np.zeros(3)  # cube centre in the gripper frame, relative to the grasp centre
        joints = getattr(self, "joints", np.zeros(kinematics.N_JOINTS))
        self._set_joints(joints)
        self._previous_gap = float(self.pose.jaw_gap)
        self._previous_tip = self.pose.tip.copy()

    def _set_joints(self, joints: np.ndarray) -> None:
        q = np.asarray(joints, dtype=float)
        if q.shape != (kinematics.N_JOINTS,):
            raise ValueError(f"follower joints must be {kinematics.N_JOINTS} values, got shape {q.shape}")
        self.joints = np.clip(q, kinematics.JOINT_LOWER, kinematics.JOINT_UPPER)
        self.pose: ArmPose = kinematics.forward(self.joints, self.geometry)

    @property
    def cubes(self) -> dict[str, Cube]:
        return self.scene.cubes

    def step(self, follower_joints: np.ndarray, dt: float) -> None:
        """Move the arm to ``follower_joints`` (normalized units) and advance objects by ``dt`` seconds."""
        self._set_joints(follower_joints)
        gap = float(self.pose.jaw_gap)
        grasp_center = self.pose.grasp_center(self.geometry)
        if self.held is not None:
            self._carry_or_release(gap, grasp_center)
        else:
            self._try_grasp(gap, grasp_center)
        if self.held is None and gap < PUSH_MAX_GAP:
            self._push_resting_cubes()
        self._fall(dt)
        self._previous_gap = gap
        self._previous_tip = self.pose.tip.copy()
        self.time += dt

    def _carry_or_release(self, gap: float, grasp_center: np.ndarray) -> None:
        cube = self.cubes[self.held]
        if gap > cube.size + RELEASE_MARGIN:
            cube.held = False
            cube.vertical_speed = 0.0
            self.held = None
            return
        cube.position = grasp_center + self.pose.rotation @ self._held_offset

    def _try_grasp(self, gap: float, grasp_center: np.ndarray) -> None:
        for cube in sorted(self.cubes.values(), key=lambda c: np.linalg.norm(c.position - grasp_center)):
            closing_through = self._previous_gap > cube.size + GRIP_MARGIN >= gap
            if not closing_through:
                continue
            local = self.pose.rotation.T @ (cube.position - grasp_center)  # approach, jaw axis, up
            between_jaws = abs(local[1]) < 0.5 * self._previous_gap
            if between_jaws and abs(local[0]) < GRASP_TOLERANCE_APPROACH and abs(local[2]) < GRASP_TOLERANCE_UP:
                local[1] = 0.0  # closing jaws centre the cube between them
                self._held_offset = local
                cube.held = True
                cube.vertical_speed = 0.0
                cube.position = grasp_center + self.pose.rotation @ local
                self.held = cube.color
                return

    def _push_resting_cubes(self) -> None:
        tip = self.pose.tip
        for cube in self.cubes.values():
            half = 0.5 * cube.size
            if cube.held or not (cube.position[2] - half - 0.01 < tip[2] < cube.position[2] + half):
                continue
            offset = tip[:2] - cube.position[:2]
            reach = half + PUSH_TIP_RADIUS
            if np.max(np.abs(offset)) >= reach:
                continue
            # the face the tip came through is the one it was furthest out of on the previous step
            came_from = self._previous_tip[:2] - cube.position[:2]
            axis = int(np.argmax(np.abs(came_from)))
            side = np.sign(came_from[axis]) or 1.0
            cube.position[axis] = tip[axis] - side * reach
            cube.position[2] = self.scene.resting_height(cube.position, cube.size)

    def _fall(self, dt: float) -> None:
        for cube in self.cubes.values():
            if cube.held:
                continue
            rest = self.scene.resting_height(cube.position, cube.size)
            if cube.position[2] <= rest:
                cube.position[2] = rest
                cube.vertical_speed = 0.0
                continue
            cube.vertical_speed -= GRAVITY * dt
            cube.position[2] = max(rest, cube.position[2] + cube.vertical_speed * dt)

    def success(self) -> bool:
        """The task's predicate on the current scene."""
        return bool(self.task.success(self.scene))

    def snapshot(self) -> dict:
        """JSON-serialisable state: task, seed, time, joints, tip, grasp, objects, verdict."""
        return {
            "task": self.task.name,
            "instruction": self.task.instruction,
            "seed": self.seed,
            "time": round(self.time, 4),
            "joints": [round(float(v), 4) for v in self.joints],
            "tip": [round(float(v), 5) for v in self.pose.tip],
            "held": self.held,
            "success": self.success(),
            **self.scene.to_dict(),
        }

