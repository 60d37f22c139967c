"""Camera images of the simulated world: pinhole projection + OpenCV primitives, painter's algorithm.

Views: ``front`` (fixed, in front of the table looking back at the arm from above), ``top`` (fixed, looking
down on the workspace) and ``wrist`` (rides on the gripper, looking along it past the jaws). Cubes and bin
walls are shaded flat faces, the arm is thick segments with joint discs, the jaws show their opening, and
every resting or carried cube casts a shadow on the table so height reads in a single image. Output is RGB.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np

from zk0.hw import kinematics
from zk0.hw.sim.tasks import COLORS
from zk0.hw.sim.world import World

TABLE_EXTENT = ((-0.10, 0.45), (-0.35, 0.35))  # x range, y range of the table top, metres
TABLE_COLOR = np.array([176, 150, 118], dtype=float)
GRID_COLOR = (150, 126, 98)
WALL_COLOR = (205, 214, 222)
BIN_COLOR = np.array([95, 95, 100], dtype=float)
BIN_FLOOR_COLOR = (70, 70, 74)
ARM_COLOR = (235, 225, 200)
MOTOR_COLOR = (40, 40, 45)
JAW_COLOR = (70, 70, 75)
SHADOW_COLOR = (120, 100, 78)
LIGHT = np.array([0.3, 0.4, 1.0]) / np.linalg.norm([0.3, 0.4, 1.0])
NEAR = 0.012  # metres; geometry closer to the camera than this is clipped
_SUBPIXEL_BITS = 4  # OpenCV fixed-point shift: sub-pixel motion still changes the image
_SCALE = 1 << _SUBPIXEL_BITS


def _grid(spacing: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    (x0, x1), (y0, y1) = TABLE_EXTENT
    xs, ys = np.arange(x0, x1 + 1e-9, spacing), np.arange(y0, y1 + 1e-9, spacing)
    starts = [[x, y0, 0.0] for x in xs] + [[x0, y, 0.0] for y in ys]
    ends = [[x, y1, 0.0] for x in xs] + [[x1, y, 0.0] for y in ys]
    return np.array(starts), np.array(ends)


_GRID_LINES = _grid()


@dataclass(frozen=True)
class FixedView:
    eye: tuple[float, float, float]
    target: tuple[float, float, float]
    vertical_fov_deg: float


FIXED_VIEWS: dict[str, FixedView] = {
    "front": FixedView(eye=(0.65, 0.0, 0.42), target=(0.14, 0.0, 0.09), vertical_fov_deg=52.0),
    "top": FixedView(eye=(0.20, 0.0, 0.75), target=(0.20, 0.0, 0.0), vertical_fov_deg=45.0),
}
WRIST_FOV_DEG = 80.0
CAMERA_NAMES: tuple[str, ...] = (*FIXED_VIEWS, "wrist")


def look_at(eye: np.ndarray, target: np.ndarray, up_hint: np.ndarray) -> np.ndarray:
    """World-to-camera rotation in OpenCV axes (x right, y down, z forward)."""
    forward = target - eye
    forward = forward / np.linalg.norm(forward)
    right = np.cross(forward, up_hint)
    if np.linalg.norm(right) < 1e-9:  # looking along the hint: any perpendicular will do
        right = np.cross(forward, np.array([1.0, 0.0, 0.0]))
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    return np.stack([right, down, forward])


def _clip_polygon_near(points: np.ndarray) -> np.ndarray:
    """Sutherland-Hodgman against the plane z=NEAR, camera coordinates (N, 3)."""
    out = []
    count = len(points)
    for i in range(count):
        a, b = points[i], points[(i + 1) % count]
        a_in, b_in = a[2] >= NEAR, b[2] >= NEAR
        if a_in:
            out.append(a)
        if a_in != b_in:
            t = (NEAR - a[2]) / (b[2] - a[2])
            out.append(a + t * (b - a))
    return np.array(out).reshape(-1, 3)


# Axis-aligned box: corner signs of its six quads (6, 4, 3), outward normals, and each face's brightness
# under the fixed light (flat shading: ambient half + diffuse half).
_BOX_CORNERS = np.array(
    [
        [[1, -1, -1], [1, 1, -1], [1, 1, 1], [1, -1, 1]],
        [[-1, -1, -1], [-1, -1, 1], [-1, 1, 1], [-1, 1, -1]],
        [[-1, 1, -1], [-1, 1, 1], [1, 1, 1], [1, 1, -1]],
        [[-1, -1, -1], [1, -1, -1], [1, -1, 1], [-1, -1, 1]],
        [[-1, -1, 1], [1, -1, 1], [1, 1, 1], [-1, 1, 1]],
        [[-1, -1, -1], [-1, 1, -1], [1, 1, -1], [1, -1, -1]],
    ],
    dtype=float,
)
_BOX_NORMALS = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], dtype=float)
_BOX_BRIGHTNESS = 0.5 + 0.5 * np.maximum(0.0, _BOX_NORMALS @ LIGHT)


def _shade(color: np.ndarray, normal: np.ndarray) -> tuple[int, int, int]:
    intensity = 0.5 + 0.5 * max(0.0, float(normal @ LIGHT))
    return tuple(int(c) for c in np.clip(color * intensity, 0, 255))


class CameraRenderer:
    """Renders one named camera of a World to an (height, width, 3) uint8 RGB image."""

    def __init__(self, name: str, width: int = 640, height: int = 480) -> None:
        if name not in CAMERA_NAMES:
            raise ValueError(f"unknown camera {name!r}; expected one of {', '.join(CAMERA_NAMES)}")
        if width < 16 or height < 16:
            raise ValueError(f"camera {name}: image size {width}x{height} is too small")
        self.name, self.width, self.height = name, int(width), int(height)
        fov = FIXED_VIEWS[name].vertical_fov_deg if name in FIXED_VIEWS else WRIST_FOV_DEG
        self.focal = 0.5 * self.height / np.tan(np.radians(0.5 * fov))
        self.center = np.array([0.5 * self.width, 0.5 * self.height])
        self._wall = np.empty((self.height, self.width, 3), dtype=np.uint8)
        self._wall[:] = WALL_COLOR
        self._background: np.ndarray | None = None  # fixed views: wall + table drawn once

    # -- camera pose -------------------------------------------------------------------------------------
    def _camera_pose(self, world: World) -> tuple[np.ndarray, np.ndarray]:
        if self.name in FIXED_VIEWS:
            view = FIXED_VIEWS[self.name]
            eye = np.array(view.eye)
            return eye, look_at(eye, np.array(view.target), np.array([0.0, 0.0, 1.0]))
        pose = world.pose
        approach, up = pose.rotation[:, 0], pose.rotation[:, 2]
        # mounted above the jaw pivot, tilted down so the jaw tips sit in the lower part of the image
        eye = pose.points[kinematics.JAW_PIVOT] + 0.035 * up - 0.01 * approach
        return eye, look_at(eye, eye + approach - 0.35 * up, up)

    # -- projection --------------------------------------------------------------------------------------
    def _to_camera(self, points: np.ndarray) -> np.ndarray:
        return (points - self._eye) @ self._rotation.T

    def _to_pixels(self, camera_points: np.ndarray) -> np.ndarray:
        uv = self.focal * camera_points[..., :2] / camera_points[..., 2:3] + self.center
        return np.round(uv * _SCALE).astype(np.int32)

    def _polygon(self, image: np.ndarray, world_points: np.ndarray, color: tuple[int, int, int]) -> None:
        self._camera_polygon(image, self._to_camera(world_points), color)

    def _camera_polygon(self, image: np.ndarray, cam: np.ndarray, color: tuple[int, int, int]) -> None:
        if np.any(cam[:, 2] < NEAR):
            cam = _clip_polygon_near(cam)
            if len(cam) < 3:
                return
        cv2.fillPoly(image, [self._to_pixels(cam)], color, lineType=cv2.LINE_8, shift=_SUBPIXEL_BITS)

    def _segment(self, image: np.ndarray, a: np.ndarray, b: np.ndarray, radius: float, color: tuple) -> None:
        cam = self._to_camera(np.stack([a, b]))
        if cam[0, 2] < NEAR and cam[1, 2] < NEAR:
            return
        if cam[0, 2] < NEAR or cam[1, 2] < NEAR:
            inside, outside = (cam[0], cam[1]) if cam[0, 2] >= NEAR else (cam[1], cam[0])
            t = (NEAR - inside[2]) / (outside[2] - inside[2])
            cam = np.stack([inside, inside + t * (outside - inside)])
        pixels = self._to_pixels(cam)
        thickness = int(np.clip(2 * radius * self.focal / cam[:, 2].mean(), 1, 200))
        cv2.line(image, tuple(pixels[0]), tuple(pixels[1]), color, thickness, cv2.LINE_AA, _SUBPIXEL_BITS)

    def _disc(self, image: np.ndarray, point: np.ndarray, radius: float, color: tuple) -> None:
        cam = self._to_camera(point[None])[0]
        if cam[2] < NEAR:
            return
        pixel_radius = int(np.clip(radius * self.focal / cam[2], 1, 400) * _SCALE)
        cv2.circle(image, tuple(self._to_pixels(cam)), pixel_radius, color, -1, cv2.LINE_AA, _SUBPIXEL_BITS)

    # -- scene -------------------------------------------------------------------------------------------
    def _draw_background(self, image: np.ndarray) -> None:
        image[:] = self._wall
        (x0, x1), (y0, y1) = TABLE_EXTENT
        table = np.array([[x0, y0, 0.0], [x1, y0, 0.0], [x1, y1, 0.0], [x0, y1, 0.0]])
        self._polygon(image, table, _shade(TABLE_COLOR, np.array([0.0, 0.0, 1.0])))
        self._grid_lines(image)

    def _grid_lines(self, image: np.ndarray) -> None:
        """5 cm grid on the table, all lines in one OpenCV call: it gives the wrist view a sense of height."""
        starts, ends = _GRID_LINES
        a, b = self._to_camera(starts), self._to_camera(ends)
        visible = (a[:, 2] >= NEAR) | (b[:, 2] >= NEAR)
        a, b = a[visible], b[visible]
        # pull the endpoint behind the camera forward onto the near plane
        behind_a = a[:, 2] < NEAR
        behind_b = b[:, 2] < NEAR
        t = (NEAR - a[:, 2]) / np.where(np.abs(b[:, 2] - a[:, 2]) < 1e-12, 1e-12, b[:, 2] - a[:, 2])
        a = np.where(behind_a[:, None], a + t[:, None] * (b - a), a)
        b = np.where(behind_b[:, None], a + t[:, None] * (b - a), b)
        lines = np.stack([self._to_pixels(a), self._to_pixels(b)], axis=1)
        cv2.polylines(image, list(lines), False, GRID_COLOR, 1, cv2.LINE_8, _SUBPIXEL_BITS)

    def _background_image(self) -> np.ndarray:
        if self.name not in FIXED_VIEWS:
            image = np.empty((self.height, self.width, 3), dtype=np.uint8)
            self._draw_background(image)
            return image
        if self._background is None:
            self._background = np.empty((self.height, self.width, 3), dtype=np.uint8)
            self._draw_background(self._background)
        return self._background.copy()

    def _scene_primitives(self, world: World) -> list[tuple[float, Callable[[np.ndarray], None]]]:
        """(depth, draw) pairs for everything above the table; drawn far to near."""
        primitives: list[tuple[float, Callable[[np.ndarray], None]]] = []

        scene_bin = world.scene.bin
        half_inner = 0.5 * scene_bin.inner_size
        wall_half = np.array([half_inner + scene_bin.wall_thickness] * 2)
        bx, by = scene_bin.center
        for axis in (0, 1):
            for side in (-1.0, 1.0):
                center = np.array([bx, by, 0.5 * scene_bin.wall_height])
                center[axis] += side * (half_inner + 0.5 * scene_bin.wall_thickness)
                half = np.array([wall_half[0], wall_half[1], 0.5 * scene_bin.wall_height])
                half[axis] = 0.5 * scene_bin.wall_thickness
                self._add_box(primitives, center, half, BIN_COLOR)

        for cube in world.cubes.values():
            self._add_box(primitives, cube.position, np.full(3, 0.5 * cube.size), np.array(COLORS[cube.color], float))

        points = world.pose.points
        links = [(kinematics.BASE, kinematics.SHOULDER, 0.022), (kinematics.SHOULDER, kinematics.ELBOW, 0.016),
                 (kinematics.ELBOW, kinematics.WRIST, 0.014), (kinematics.WRIST, kinematics.JAW_PIVOT, 0.013)]
        for start, end, radius in links:
            a, b = points[start], points[end]
            depth = float(self._to_camera(np.stack([a, b]))[:, 2].mean())
            primitives.append((depth, lambda img, a=a, b=b, r=radius: self._segment(img, a, b, r, ARM_COLOR)))
        # the wrist camera sits on the jaw pivot's motor, so it does not see that one
        motors = (kinematics.SHOULDER, kinematics.ELBOW, kinematics.WRIST)
        for joint in motors if self.name == "wrist" else (*motors, kinematics.JAW_PIVOT):
            p = points[joint]
            depth = float(self._to_camera(p[None])[0, 2]) - 0.01
            primitives.append((depth, lambda img, p=p: self._disc(img, p, 0.017, MOTOR_COLOR)))
        pose = world.pose
        pivot, jaw_axis = points[kinematics.JAW_PIVOT], pose.jaw_axis
        held_gap = world.cubes[world.held].size if world.held else np.inf
        half_gap = 0.5 * min(float(pose.jaw_gap), held_gap)  # jaws stop on a held cube
        for side in (-1.0, 1.0):
            root = pivot + side * 0.012 * jaw_axis
            tip = pose.tip + side * half_gap * jaw_axis
            depth = float(self._to_camera(np.stack([root, tip]))[:, 2].mean())
            primitives.append((depth, lambda img, a=root, b=tip: self._segment(img, a, b, 0.006, JAW_COLOR)))
        return primitives

    def _add_box(self, primitives: list, center: np.ndarray, half: np.ndarray, color: np.ndarray) -> None:
        """Queue the box's camera-facing faces (back faces are hidden by the front ones)."""
        facing = np.flatnonzero((_BOX_NORMALS * (self._eye - center - _BOX_NORMALS * half)).sum(axis=1) > 0)
        cam = self._to_camera((center + _BOX_CORNERS[facing] * half).reshape(-1, 3)).reshape(-1, 4, 3)
        colors = np.clip(np.outer(_BOX_BRIGHTNESS[facing], color), 0, 255).astype(int).tolist()
        for quad, rgb in zip(cam, colors):
            primitives.append((quad[:, 2].sum() * 0.25, lambda img, q=quad, c=tuple(rgb): self._camera_polygon(img, q, c)))

    def _draw_bin_floor(self, image: np.ndarray, world: World) -> None:
        scene_bin = world.scene.bin
        half = 0.5 * scene_bin.inner_size
        (x, y), z = scene_bin.center, scene_bin.floor_height
        floor = np.array([[x - half, y - half, z], [x + half, y - half, z], [x + half, y + half, z], [x - half, y + half, z]])
        self._polygon(image, floor, BIN_FLOOR_COLOR)

    def _draw_shadows(self, image: np.ndarray, world: World) -> None:
        for cube in world.cubes.values():
            floor = world.scene.resting_height(cube.position, cube.size) - 0.5 * cube.size
            if cube.position[2] - 0.5 * cube.size - floor < 1e-3 and floor == 0.0:
                continue  # a cube resting on the table hides its own shadow
            # wider the higher the cube is, as under a broad overhead light
            grow = 1.0 + 2.0 * max(0.0, cube.position[2] - floor)
            half = 0.5 * cube.size * grow
            x, y = cube.position[:2]
            quad = np.array([[x - half, y - half, floor + 5e-4], [x + half, y - half, floor + 5e-4],
                             [x + half, y + half, floor + 5e-4], [x - half, y + half, floor + 5e-4]])
            self._polygon(image, quad, SHADOW_COLOR)

    def render(self, world: World) -> np.ndarray:
        """The camera's view of ``world`` now: (height, width, 3) uint8 RGB."""
        self._eye, self._rotation = self._camera_pose(world)
        image = self._background_image()
        self._draw_bin_floor(image, world)
        self._draw_shadows(image, world)
        for _, draw in sorted(self._scene_primitives(world), key=lambda item: -item[0]):
            draw(image)
        return image
