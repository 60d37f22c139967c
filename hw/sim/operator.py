"""A scripted human tele-operator: moves the leader arm through a task the way a person would.

The plan is a sequence of Cartesian moves of the gripper (grasp-centre position, approach pitch, gripper
opening), each a minimum-jerk blend from where the previous one ended to a goal that is re-read from the
world on every call, so the operator follows a cube that slid and aims at where things actually are.
Human-ness comes from a seeded style: reaction delay, per-move timing variation, aim error that is corrected
while looking at the follower, and a smooth hand tremor. A failed grasp or a short push is retried.
Same (task, seed): same noise and timing, so episodes replay.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

from zk0.hw import kinematics
from zk0.hw.sim.tasks import PUSH_SUCCESS_DISTANCE, Task, get_task
from zk0.hw.sim.world import PUSH_TIP_RADIUS, World

HOVER_HEIGHT = 0.07  # grasp centre above the cube top while lining up
CARRY_HEIGHT = 0.10  # grasp centre height while carrying to the bin
PUSH_TIP_HEIGHT = 0.012  # tip height during a push stroke
PUSH_OVERSHOOT = 0.03  # the stroke aims this far past the success distance
REST_POSITION = np.array([0.17, 0.0, 0.15])  # where the hand goes when the task is done
PUSH_SPEED_M_S = 0.03  # a careful push: fast strokes make people overshoot
MAX_RETRIES = 2


@dataclass(frozen=True)
class OperatorStyle:
    """Ranges the per-episode human style is drawn from."""

    reaction_delay_s: tuple[float, float] = (0.2, 0.6)
    tempo: tuple[float, float] = (0.95, 1.3)  # multiplies every move duration
    move_jitter: float = 0.12  # relative per-move duration variation
    speed_m_s: float = 0.12  # nominal hand speed for travel moves
    aim_error_m: float = 0.004  # std of where the hand first aims
    tremor_m: float = 0.0015  # amplitude of the smooth tremor
    tremor_pitch_deg: float = 1.0
    correction_gain: float = 3.0  # 1/s, how fast the operator corrects the follower's aim while lining up


@dataclass(frozen=True)
class Waypoint:
    """A gripper pose goal: grasp-centre position (m), approach pitch (deg), gripper (0..100)."""

    position: np.ndarray
    pitch: float
    gripper: float


@dataclass(frozen=True)
class Move:
    name: str
    duration: float
    goal: Callable[[World], Waypoint]
    corrects_aim: bool = False  # watch follower vs. target and steer out the difference


def minimum_jerk(fraction: np.ndarray | float) -> np.ndarray | float:
    """Minimum-jerk time scaling s(tau) = 10 tau^3 - 15 tau^4 + 6 tau^5 on [0, 1]."""
    tau = np.clip(fraction, 0.0, 1.0)
    return tau**3 * (10.0 - 15.0 * tau + 6.0 * tau**2)


def approach_pitch_for(position: np.ndarray) -> float:
    """Top-down low and near the base; tilted forward further out or higher up, where a vertical gripper
    would need more wrist flex than the SO-101's range."""
    radius = float(np.hypot(position[0], position[1]))
    far = float(np.clip((radius - 0.21) / 0.08, 0.0, 1.0))
    high = float(np.clip((position[2] - 0.05) / 0.10, 0.0, 1.0))
    return -90.0 + 30.0 * far + 35.0 * high


class _Tremor:
    """Smooth band-limited noise: a few seeded sinusoids per channel (0.3-1.5 Hz, like physiological drift)."""

    def __init__(self, rng: np.random.Generator, amplitudes: np.ndarray, components: int = 3) -> None:
        channels = len(amplitudes)
        self.frequencies = rng.uniform(0.3, 1.5, size=(components, channels))
        self.phases = rng.uniform(0.0, 2 * np.pi, size=(components, channels))
        self.amplitudes = amplitudes / np.sqrt(components)

    def __call__(self, t: float) -> np.ndarray:
        return self.amplitudes * np.sin(2 * np.pi * self.frequencies * t + self.phases).sum(axis=0)


class ScriptedOperator:
    """Leader-arm trajectory for one episode of ``task``; call ``leader_joints`` with increasing ``t``."""

    def __init__(self, task: str | Task, seed: int, robot: str = "so101", style: OperatorStyle = OperatorStyle()):
        self.task = task if isinstance(task, Task) else get_task(task)
        self.seed = int(seed)
        self.geometry = kinematics.geometry_for(robot)
        self.style = style
        # the operator's own stream, independent of the world's placement stream
        self._rng = np.random.default_rng([self.seed, zlib.crc32(self.task.name.encode())])
        self._tempo = float(self._rng.uniform(*style.tempo))
        self._start_delay = float(self._rng.uniform(*style.reaction_delay_s))
        self._tremor = _Tremor(self._rng, np.array([style.tremor_m] * 3 + [style.tremor_pitch_deg]))
        self._open_width = float(self._rng.uniform(70.0, 95.0))
        self._moves: list[Move] = []
        self._move_index = -1
        self._move_start_t = 0.0
        self._move_start: Waypoint | None = None
        self._command: Waypoint | None = None
        self._joints: np.ndarray | None = None
        self._aim_error = np.zeros(3)
        self._aim_correction = np.zeros(3)
        self._retries = 0
        self._finished_at: float | None = None
        self._last_t = 0.0

    # -- plans -------------------------------------------------------------------------------------------
    def _duration(self, nominal: float) -> float:
        return nominal * self._tempo * float(1.0 + self._rng.uniform(-1, 1) * self.style.move_jitter)

    def _travel_time(self, world: World, goal: Callable[[World], Waypoint], minimum: float) -> float:
        distance = float(np.linalg.norm(goal(world).position - self._command.position))
        return self._duration(max(minimum, distance / self.style.speed_m_s))

    def _draw_aim_error(self) -> None:
        self._aim_error = np.append(self._rng.normal(0.0, self.style.aim_error_m, size=2), 0.0)
        self._aim_correction = np.zeros(3)

    def _plan_pick_place(self, world: World) -> list[Move]:
        color, open_width = self.task.target, self._open_width

        def cube(w: World) -> np.ndarray:
            return w.cubes[color].position + self._aim_error + self._aim_correction

        def grasp_height(w: World, position: np.ndarray) -> float:
            # keep the jaw tips just off the table when the pitch is not vertical
            pitch = np.radians(approach_pitch_for(position))
            return max(position[2], 0.003 - self.geometry.grasp_depth * np.sin(pitch))

        def hover(w: World) -> Waypoint:
            p = cube(w) + [0.0, 0.0, w.cubes[color].size / 2 + HOVER_HEIGHT]
            return Waypoint(p, approach_pitch_for(p), open_width)

        def at_cube(w: World) -> Waypoint:
            p = cube(w).copy()
            p[2] = grasp_height(w, p)
            return Waypoint(p, approach_pitch_for(p), open_width)

        def closed_on_cube(w: World) -> Waypoint:
            return Waypoint(self._move_start.position, self._move_start.pitch, 0.0)

        def lifted(w: World) -> Waypoint:
            p = self._move_start.position.copy()
            p[2] = CARRY_HEIGHT
            return Waypoint(p, approach_pitch_for(p), 0.0)

        def over_bin(w: World, height: float, gripper: float) -> Waypoint:
            p = np.array([*w.scene.bin.center, height])
            return Waypoint(p, approach_pitch_for(p), gripper)

        above_bin = lambda w: over_bin(w, CARRY_HEIGHT, 0.0)  # noqa: E731
        lowered = lambda w: over_bin(w, w.scene.bin.wall_height + 0.035, 0.0)  # noqa: E731
        released = lambda w: over_bin(w, w.scene.bin.wall_height + 0.035, open_width)  # noqa: E731

        return [
            Move("approach", self._travel_time(world, hover, 1.4), hover),
            Move("descend", self._duration(1.0), at_cube, corrects_aim=True),
            Move("line_up", self._duration(0.35), at_cube, corrects_aim=True),
            Move("close", self._duration(0.6), closed_on_cube),
            Move("check_grasp", self._duration(0.15), closed_on_cube),
            Move("lift", self._duration(0.9), lifted),
            Move("carry", self._duration(1.6), above_bin),
            Move("lower", self._duration(0.6), lowered),
            Move("release", self._duration(0.5), released),
            Move("let_go", self._duration(0.3), released),
            *self._retreat(),
        ]

    def _plan_push(self, world: World) -> list[Move]:
        color, direction = self.task.target, self.task.push_direction
        half = world.cubes[color].size / 2
        behind = half + PUSH_TIP_RADIUS + 0.012  # where the tip starts, behind the face it pushes
        start_y = float(world.cubes[color].position[1])
        goal_y = (
            world.scene.initial_positions[color][1] + direction * (PUSH_SUCCESS_DISTANCE + PUSH_OVERSHOOT)
        )
        gripper = float(self._rng.uniform(0.0, 8.0))  # closed, the jaws act as one finger

        def tip_to_grasp(tip: np.ndarray) -> np.ndarray:
            return tip - self.geometry.grasp_depth * kinematics.approach_direction(tip, approach_pitch_for(tip))

        def pre_push(w: World, height: float) -> Waypoint:
            cube = w.cubes[color].position + self._aim_error + self._aim_correction
            tip = np.array([cube[0], cube[1] - direction * behind, height])
            return Waypoint(tip_to_grasp(tip), approach_pitch_for(tip), gripper)

        def stroke_end(w: World) -> Waypoint:
            # steer along the cube's current x so the tip stays on the middle of its face
            cube = w.cubes[color].position
            tip = np.array([cube[0], goal_y - direction * (half + PUSH_TIP_RADIUS), PUSH_TIP_HEIGHT])
            return Waypoint(tip_to_grasp(tip), approach_pitch_for(tip), gripper)

        def lifted(w: World) -> Waypoint:
            p = self._move_start.position + [0.0, 0.0, 0.06]
            return Waypoint(p, approach_pitch_for(p), gripper)

        hover = lambda w: pre_push(w, 0.06)  # noqa: E731
        down = lambda w: pre_push(w, PUSH_TIP_HEIGHT)  # noqa: E731
        stroke_length = abs(goal_y - start_y)
        return [
            Move("approach", self._travel_time(world, hover, 1.8), hover),
            Move("descend", self._duration(1.1), down, corrects_aim=True),
            Move("line_up", self._duration(0.4), down, corrects_aim=True),
            Move("stroke", self._duration(max(1.5, stroke_length / PUSH_SPEED_M_S)), stroke_end),
            Move("check_push", self._duration(0.15), stroke_end),
            Move("lift", self._duration(0.7), lifted),
            *self._retreat(),
        ]

    def _retreat(self) -> list[Move]:
        def rest(w: World) -> Waypoint:
            return Waypoint(REST_POSITION, approach_pitch_for(REST_POSITION), self._move_start.gripper)

        return [Move("retreat", self._duration(1.2), rest), Move("settle", self._duration(0.4), rest)]

    def _plan(self, world: World) -> list[Move]:
        self._draw_aim_error()
        return self._plan_pick_place(world) if self.task.kind == "pick_place" else self._plan_push(world)

    # -- execution ---------------------------------------------------------------------------------------
    def _needs_retry(self, finished: Move, world: World) -> bool:
        if self._retries >= MAX_RETRIES:
            return False
        if finished.name == "check_grasp":
            return world.held != self.task.target
        if finished.name == "check_push":
            start = world.scene.initial_positions[self.task.target]
            travelled = (world.cubes[self.task.target].position[1] - start[1]) * self.task.push_direction
            return travelled < PUSH_SUCCESS_DISTANCE + 0.01
        return False

    def _advance(self, t: float, world: World) -> None:
        """Move on to the next move (or a fresh plan on retry) when the current one has run its course."""
        while self._finished_at is None:
            current = self._moves[self._move_index] if self._move_index >= 0 else None
            if current is not None and t - self._move_start_t < current.duration:
                return
            if current is None and t < self._start_delay:
                return
            start_t = self._move_start_t + current.duration if current else self._start_delay
            retry = current is not None and self._needs_retry(current, world)
            if current is None or retry:
                self._retries += retry
                self._moves = self._plan(world)
                self._move_index = 0
            elif self._move_index + 1 < len(self._moves):
                self._move_index += 1
            else:
                self._finished_at = start_t
                return
            self._move_start_t = start_t
            self._move_start = self._command

    def leader_joints(self, t: float, world: World) -> np.ndarray:
        """Leader joint vector (normalized units) at episode time ``t`` seconds, given the world now."""
        dt = max(0.0, t - self._last_t)
        self._last_t = t
        if self._command is None:  # start wherever the follower is
            pose = world.pose
            pitch = float(kinematics.approach_pitch_deg(world.joints))
            self._command = Waypoint(pose.grasp_center(self.geometry), pitch, float(world.joints[5]))
            self._joints = world.joints.copy()
        self._advance(t, world)
        if self._finished_at is None and self._move_index >= 0:
            move = self._moves[self._move_index]
            if move.corrects_aim:
                self._correct_aim(world, dt)
            goal = move.goal(world)
            s = float(minimum_jerk((t - self._move_start_t) / move.duration))
            start = self._move_start
            self._command = Waypoint(
                start.position + s * (goal.position - start.position),
                start.pitch + s * (goal.pitch - start.pitch),
                start.gripper + s * (goal.gripper - start.gripper),
            )
        tremor = self._tremor(t)
        target = self._command.position + tremor[:3]
        pitch = self._command.pitch + tremor[3]
        tip = kinematics.tip_for_grasp_center(target, pitch, self.geometry)
        solution = kinematics.solve_ik(tip, pitch, self._joints, self.geometry)
        joints = solution.joints
        joints[4] = 2.0 * tremor[3]  # the wrist rolls a little with the hand
        joints[5] = float(np.clip(self._command.gripper, 0.0, 100.0))
        self._joints = joints
        return joints.copy()

    def _correct_aim(self, world: World, dt: float) -> None:
        """Watch where the follower's jaws are versus the cube and steer the difference out (xy only)."""
        cube = world.cubes[self.task.target].position
        follower = world.pose.grasp_center(self.geometry)
        if self.task.kind == "push":  # the pusher lines up behind the cube, compare along x only
            error = np.array([cube[0] - follower[0], 0.0, 0.0])
        else:
            error = np.array([cube[0] - follower[0], cube[1] - follower[1], 0.0])
        self._aim_correction = np.clip(self._aim_correction + self.style.correction_gain * dt * error, -0.01, 0.01)

    def done(self, t: float, world: World) -> bool:
        """The plan has run to its end (retries included, success or not); the episode can stop.

        ``world`` is part of the operator contract; the plan already reads it on every ``leader_joints`` call.
        """
        return self._finished_at is not None and t >= self._finished_at

    @property
    def retries(self) -> int:
        """How many times a missed grasp or short push was started over."""
        return self._retries

    @property
    def phase(self) -> str:
        """Name of the current move, for logs and overlays."""
        if self._finished_at is not None:
            return "done"
        return self._moves[self._move_index].name if self._move_index >= 0 else "waiting"
