"""Simulated tabletop tasks: scene objects, per-episode placement, and success predicates.

A task names the instruction stored in datasets, how its objects are placed from a seeded RNG, and a pure
predicate on the scene. Hosts pick different task mixes, which is what makes the federation non-IID.
Coordinates follow zk0.hw.kinematics: metres, x forward from the robot base, y to the robot's left, z up,
table at z=0. "Left"/"right" are the robot's left (+y) and right (-y).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

CUBE_SIZE = 0.03
COLORS: dict[str, tuple[int, int, int]] = {"red": (210, 40, 35), "green": (40, 170, 60), "blue": (35, 70, 210)}
PUSH_SUCCESS_DISTANCE = 0.05  # metres the cube must travel along the push direction
MIN_CUBE_SEPARATION = 0.065  # centre-to-centre, so the gripper fits between cubes


@dataclass(frozen=True)
class Bin:
    """Open box on the table; ``center`` is its footprint centre (x, y)."""

    center: tuple[float, float]
    inner_size: float = 0.10
    wall_height: float = 0.04
    wall_thickness: float = 0.006
    floor_height: float = 0.004

    def contains_xy(self, xy: np.ndarray, margin: float = 0.0) -> bool:
        """Whether a point lies over the bin's floor, at least ``margin`` inside the walls."""
        half = 0.5 * self.inner_size - margin
        return bool(np.all(np.abs(np.asarray(xy[:2]) - np.asarray(self.center)) <= half))

    def to_dict(self) -> dict:
        return {"center": list(self.center), "inner_size": self.inner_size, "wall_height": self.wall_height}


@dataclass
class Cube:
    """Axis-aligned cube; ``position`` is its centre."""

    color: str
    position: np.ndarray
    size: float = CUBE_SIZE
    held: bool = False
    vertical_speed: float = 0.0  # m/s, positive up; nonzero only while falling

    def to_dict(self) -> dict:
        return {
            "color": self.color,
            "position": [round(float(v), 5) for v in self.position],
            "size": self.size,
            "held": self.held,
        }


@dataclass
class Scene:
    """Object state a predicate judges: cubes by colour, the bin, and where each cube started."""

    cubes: dict[str, Cube]
    bin: Bin
    initial_positions: dict[str, np.ndarray] = field(default_factory=dict)

    def resting_height(self, xy: np.ndarray, size: float) -> float:
        """Centre height of a cube resting at ``xy``: on the bin floor inside the bin, else on the table."""
        floor = self.bin.floor_height if self.bin.contains_xy(xy) else 0.0
        return floor + 0.5 * size

    def in_bin(self, color: str) -> bool:
        cube = self.cubes[color]
        resting = not cube.held and cube.position[2] <= self.bin.wall_height
        return resting and self.bin.contains_xy(cube.position)

    def on_table(self, color: str) -> bool:
        cube = self.cubes[color]
        return not cube.held and bool(abs(cube.position[2] - 0.5 * cube.size) < 1e-3)

    def to_dict(self) -> dict:
        return {
            "cubes": [c.to_dict() for c in self.cubes.values()],
            "bin": self.bin.to_dict(),
            "initial_positions": {k: [round(float(v), 5) for v in p] for k, p in self.initial_positions.items()},
        }


TaskKind = Literal["pick_place", "push"]

# Workspace the arm reaches comfortably with a top-down gripper (x range, |y| bound).
_WORKSPACE_X = (0.16, 0.26)
_WORKSPACE_Y = 0.11
# Push tasks: where the cube starts (x range; y range measured against the push direction, so a "left" push
# starts between 4 cm left and 11 cm right of centre) and how far out the bin sits on the side it starts from.
_PUSH_START_X = (0.14, 0.27)
_PUSH_START_BACK = (-0.04, 0.11)
_PUSH_BIN_Y = (0.23, 0.25)


@dataclass(frozen=True)
class Task:
    name: str
    instruction: str  # the task string stored with each recorded frame
    kind: TaskKind
    target: str  # colour of the cube the task is about
    distractors: tuple[str, ...] = ()
    push_direction: float = 0.0  # +1 left (+y), -1 right (-y); push tasks only

    def place(self, rng: np.random.Generator) -> Scene:
        """Draw a scene for one episode. Same RNG state, same scene."""
        if self.kind == "push":
            # The bin stays out of the way, beyond where the stroke starts. The cube may start anywhere in a
            # wide band (the stroke still ends inside the workspace): a stroke at the mean position, blind to
            # the scene, misses it or pushes it too little (bench/task_discrimination.py).
            back = -self.push_direction
            scene_bin = Bin(center=(float(rng.uniform(0.15, 0.20)), float(back * rng.uniform(*_PUSH_BIN_Y))))
            target_xy = np.array([rng.uniform(*_PUSH_START_X), back * rng.uniform(*_PUSH_START_BACK)])
        else:
            bin_side = rng.choice([-1.0, 1.0])
            scene_bin = Bin(center=(float(rng.uniform(0.15, 0.20)), float(bin_side * rng.uniform(0.15, 0.17))))
            target_xy = np.array([rng.uniform(*_WORKSPACE_X), rng.uniform(-0.06, 0.06)])
        positions = {self.target: target_xy}
        for color in self.distractors:
            positions[color] = self._free_spot(rng, positions, scene_bin, target_xy)
        cubes = {
            color: Cube(color=color, position=np.array([xy[0], xy[1], 0.5 * CUBE_SIZE])) for color, xy in positions.items()
        }
        return Scene(cubes=cubes, bin=scene_bin, initial_positions={c: cube.position.copy() for c, cube in cubes.items()})

    def _free_spot(
        self, rng: np.random.Generator, taken: dict[str, np.ndarray], scene_bin: Bin, target_xy: np.ndarray
    ) -> np.ndarray:
        for _ in range(1000):
            xy = np.array([rng.uniform(0.13, 0.28), rng.uniform(-_WORKSPACE_Y - 0.05, _WORKSPACE_Y + 0.05)])
            clear_of_cubes = all(np.linalg.norm(xy - other) >= MIN_CUBE_SEPARATION for other in taken.values())
            clear_of_bin = not scene_bin.contains_xy(xy, margin=-0.04)
            if clear_of_cubes and clear_of_bin and not self._in_push_corridor(xy, target_xy):
                return xy
        raise RuntimeError(f"task {self.name}: could not place distractors without overlap")

    def _in_push_corridor(self, xy: np.ndarray, target_xy: np.ndarray) -> bool:
        if self.kind != "push":
            return False
        along = (xy[1] - target_xy[1]) * self.push_direction
        return abs(xy[0] - target_xy[0]) < 0.06 and -0.08 < along < 0.16

    def success(self, scene: Scene) -> bool:
        if self.kind == "pick_place":
            return scene.in_bin(self.target)
        start = scene.initial_positions[self.target]
        travelled = (scene.cubes[self.target].position[1] - start[1]) * self.push_direction
        return scene.on_table(self.target) and travelled >= PUSH_SUCCESS_DISTANCE


def _pick_place(color: str) -> Task:
    others = tuple(c for c in COLORS if c != color)
    return Task(f"pick_place_{color}", f"pick the {color} cube and place it in the bin", "pick_place", color, others)


def _push(color: str, direction: float) -> Task:
    side = "left" if direction > 0 else "right"
    others = tuple(c for c in COLORS if c != color)
    return Task(f"push_{color}_{side}", f"push the {color} cube {side}", "push", color, others, direction)


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        _pick_place("red"),
        _pick_place("blue"),
        _pick_place("green"),
        _push("blue", +1.0),
        _push("green", -1.0),
        _push("red", +1.0),
        _push("red", -1.0),
    )
}


def get_task(name_or_instruction: str) -> Task:
    """Task by registry name (``pick_place_red``) or by its instruction string."""
    if name_or_instruction in TASKS:
        return TASKS[name_or_instruction]
    for task in TASKS.values():
        if task.instruction == name_or_instruction:
            return task
    raise ValueError(f"unknown task {name_or_instruction!r}; known: {', '.join(TASKS)}")
