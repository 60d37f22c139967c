"""The simulated tabletop: arm pose from the follower's joints, cubes, bin, and a kinematic grasp/push model.

Physics is deliberately kinematic: a cube between closing jaws attaches and rides with the gripper, opening
the jaws lets it fall (onto the table or the bin floor), and a closed gripper tip pushes resting cubes out of
its way. The table is solid: the arm stops where it touches it (`stop_at_table`), and the steps it spent
pressing into it are counted. That is enough for the pick-place and push tasks in tasks.py and keeps a step
well under a millisecond.
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
# Keypoints that must stay on or above the table (z=0): the elbow, wrist and jaw pivot axes and the gripper tip.
TABLE_POINTS = (kinematics.ELBOW, kinematics.WRIST, kinematics.JAW_PIVOT, kinematics.TIP)
_PLANAR = slice(1, 4)  # shoulder_lift, elbow_flex, wrist_flex: the only joints that change a keypoint's height
_PATH_SAMPLES = 8  # points checked along one step's joint path before bisecting the first contact
_CONTACT_BISECTIONS = 12


def lowest_point(joints: np.ndarray, geometry: ArmGeometry) -> np.ndarray:
    """Height (m) of the arm's lowest keypoint in `TABLE_POINTS`, for joint vectors shaped (..., 6)."""
    return kinematics.forward(joints, geometry).points[..., TABLE_POINTS, 2].min(axis=-1)


def stop_at_table(previous: np.ndarray, commanded: np.ndarray, geometry: ArmGeometry) -> tuple[np.ndarray, bool]:
    """Where the arm ends when it moves from `previous` towards `commanded` and the table is in the way, and
    whether the table stopped it.

    The servos move every joint at once, so over one world step (a few milliseconds) the path is a straight
    line in joint space. The arm follows it until a keypoint touches the table and stays there: the
    lift/elbow/wrist servos stall against the table as they would against any rigid obstacle, pressing
    until they are commanded back up. Pan, roll and gripper never change a keypoint's height, so they keep
    following their commands and the arm slides along the table (friction is not modelled). A pose already
    below the table (only reachable by constructing it) may rise but never sink further.
    """
    if lowest_point(commanded, geometry) >= 0.0:
        return commanded, False
    fractions = np.linspace(0.0, 1.0, _PATH_SAMPLES + 1)
    path = np.repeat(commanded[None], len(fractions), axis=0)
    path[:, _PLANAR] = previous[_PLANAR] + fractions[:, None] * (commanded[_PLANAR] - previous[_PLANAR])
    heights = lowest_point(path, geometry)
    floor = min(0.0, float(heights[0]))
    if not np.any(heights < floor):  # it started below (constructed) and rises: let it
        return commanded, True
    first_below = int(np.argmax(heights < floor))
    free, blocked = fractions[first_below - 1], fractions[first_below]
    for _ in range(_CONTACT_BISECTIONS):
        middle = 0.5 * (free + blocked)
        pose = commanded.copy()
        pose[_PLANAR] = previous[_PLANAR] + middle * (commanded[_PLANAR] - previous[_PLANAR])
        if lowest_point(pose, geometry) >= floor:
            free = middle
        else:
            blocked = middle
    stopped = commanded.copy()
    stopped[_PLANAR] = previous[_PLANAR] + free * (commanded[_PLANAR] - previous[_PLANAR])
    return stopped, True


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
        self.table_contacts = 0  # steps the arm spent pressing into the table
        self.pressing_table = False  # the last step's command pushed into the table
        self.place_arm(getattr(self, "joints", np.zeros(kinematics.N_JOINTS)))

    def place_arm(self, joints: np.ndarray) -> None:
        """Put the arm at `joints` at once, moving nothing else: a still for rendering, not a motion."""
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
        """Move the arm towards ``follower_joints`` (normalized units; the table may stop it, see
        `stop_at_table`) and advance objects by ``dt`` seconds."""
        previous = self.joints
        self._set_joints(follower_joints)
        stopped, self.pressing_table = stop_at_table(previous, self.joints, self.geometry)
        if self.pressing_table:
            self._set_joints(stopped)
            self.table_contacts += 1
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
        """The tip, a disc seen from above, moves each cube it overlaps the shortest way out of it (no
        rotation): squarely on a face the cube goes straight ahead, on a corner it is pushed aside and the
        tip slides past, as a cube glances off a finger that only catches its edge."""
        tip = self.pose.tip
        for cube in self.cubes.values():
            half = 0.5 * cube.size
            if cube.held or not (cube.position[2] - half - 0.01 < tip[2] < cube.position[2] + half):
                continue
            offset = tip[:2] - cube.position[:2]
            nearest = np.clip(offset, -half, half)  # the point of the cube's footprint nearest the tip
            outside = offset - nearest
            distance = float(np.linalg.norm(outside))
            if distance >= PUSH_TIP_RADIUS:
                continue
            if distance > 1e-9:
                cube.position[:2] = tip[:2] - nearest - outside / distance * PUSH_TIP_RADIUS
            else:
                # the tip's centre got inside in one step: out through the face it was furthest out of before
                came_from = self._previous_tip[:2] - cube.position[:2]
                axis = int(np.argmax(np.abs(came_from)))
                side = np.sign(came_from[axis]) or 1.0
                cube.position[axis] = tip[axis] - side * (half + PUSH_TIP_RADIUS)
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
            "table_contacts": self.table_contacts,
            "success": self.success(),
            **self.scene.to_dict(),
        }

