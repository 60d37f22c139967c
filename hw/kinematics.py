"""SO-100/SO-101 forward kinematics and a small damped-least-squares IK, pure numpy.

World frame: metres, x forward from the robot base, y to the robot's left, z up; the table top is z=0
and the base sits at the origin.

Joint convention (lerobot normalized units with ``use_degrees=True``; 0 = middle of the calibrated range),
matching the SO-101 ``so101_new_calib.urdf`` joint zeros and directions:

- ``shoulder_pan`` (q0): rotation about world z; positive turns the arm to the robot's right (clockwise
  seen from above).
- ``shoulder_lift`` (q1): 0 holds the upper arm (nearly) upright; positive tilts it forward/down.
- ``elbow_flex`` (q2): 0 holds the forearm horizontal when q1=0; positive folds it down.
- ``wrist_flex`` (q3): 0 keeps the gripper in line with the forearm; positive pitches it down.
- ``wrist_roll`` (q4): rotation about the gripper's approach axis (direction not checked against hardware).
- ``gripper`` (q5): 0 closed .. 100 fully open, mapped linearly to the jaw gap.

So the middle-of-range calibration pose is an "L": upper arm up, forearm and gripper pointing forward. Each
link is a fixed vector in the arm's vertical plane (forward, up) at that pose, rotated down by the sum of
the lift/elbow/wrist angles before it; the gripper's elevation, -(q1 + q2 + q3), is the "approach pitch"
used by the IK (-90 = pointing straight down).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

JOINT_NAMES: tuple[str, ...] = (
    "shoulder_pan",
    "shoulder_lift",
    "elbow_flex",
    "wrist_flex",
    "wrist_roll",
    "gripper",
)
N_JOINTS = len(JOINT_NAMES)

# Commanded range the simulated arm accepts, per joint (normalized units). The simulated calibration must
# cover these; the IK clamps to them.
JOINT_LOWER = np.array([-110.0, -100.0, -100.0, -100.0, -160.0, 0.0])
JOINT_UPPER = np.array([110.0, 100.0, 100.0, 100.0, 160.0, 100.0])

# Index of each keypoint in ``ArmPose.points``.
BASE, SHOULDER, ELBOW, WRIST, JAW_PIVOT, TIP = range(6)


@dataclass(frozen=True)
class ArmGeometry:
    """One arm model's links as (forward, up) vectors in the calibration pose, metres, joint axis to joint
    axis, read off TheRobotStudio SO-ARM100 URDFs. The URDF's two 18 mm sideways offsets (shoulder and wrist
    roll) cancel, so the tip stays in the pan plane and the chain is planar."""

    name: str
    shoulder: tuple[float, float]  # pan axis at the table -> shoulder_lift axis
    upper_arm: tuple[float, float]  # shoulder_lift axis -> elbow_flex axis (the link has a dog-leg)
    forearm: tuple[float, float]  # elbow_flex axis -> wrist_flex axis
    wrist: tuple[float, float]  # wrist_flex axis -> jaw pivot (wrist_roll frame), along the approach axis
    gripper: tuple[float, float]  # jaw pivot -> jaw tips
    max_jaw_gap: float  # jaw tip separation at gripper=100
    grasp_depth: float  # how far behind the tips the jaw pads hold an object

    def __post_init__(self) -> None:
        if self.max_jaw_gap <= 0 or self.grasp_depth < 0 or self.wrist[0] <= 0:
            raise ValueError(f"arm geometry {self.name!r}: jaw gap, grasp depth and wrist length must be positive")

    @property
    def links(self) -> np.ndarray:
        """(4, 2) upper arm, forearm, wrist, gripper vectors (forward, up) in the calibration pose."""
        return np.array([self.upper_arm, self.forearm, self.wrist, self.gripper])


# SO-101 (Simulation/SO101/so101_new_calib.urdf).
SO101 = ArmGeometry(
    name="so101",
    shoulder=(0.0304, 0.1491),
    upper_arm=(0.0280, 0.1126),
    forearm=(0.1349, 0.0052),
    wrist=(0.0611, 0.0),
    gripper=(0.0981, -0.0079),
    max_jaw_gap=0.08,
    grasp_depth=0.018,
)
# SO-100 (Simulation/SO100/so100.urdf): the same upper arm and forearm, a 1 mm shorter wrist; its URDF
# zero is not the calibration middle, so the rest is taken from the SO-101.
SO100 = ArmGeometry(
    name="so100",
    shoulder=(0.0304, 0.1491),
    upper_arm=(0.0280, 0.1126),
    forearm=(0.1349, 0.0052),
    wrist=(0.0601, 0.0),
    gripper=(0.0981, -0.0079),
    max_jaw_gap=0.08,
    grasp_depth=0.018,
)
GEOMETRIES: dict[str, ArmGeometry] = {g.name: g for g in (SO101, SO100)}


def geometry_for(robot: str) -> ArmGeometry:
    """Geometry by robot name: ``so101``/``so100`` (a ``_follower``/``_leader`` suffix is accepted)."""
    key = robot.lower().split("_")[0]
    if key not in GEOMETRIES:
        raise ValueError(f"unknown arm {robot!r}; expected one of {sorted(GEOMETRIES)}")
    return GEOMETRIES[key]


@dataclass(frozen=True)
class ArmPose:
    """Forward-kinematics result; every array has the joint batch shape ``B`` in front.

    points: (B..., 6, 3) base, shoulder, elbow, wrist, jaw pivot, tip (see the index constants).
    rotation: (B..., 3, 3) gripper frame, columns = approach axis (pivot->tip), jaw axis (direction the
        jaws open along), and their cross product (the gripper's "up").
    jaw_gap: (B...) jaw tip separation in metres.
    """

    points: np.ndarray
    rotation: np.ndarray
    jaw_gap: np.ndarray

    @property
    def tip(self) -> np.ndarray:
        return self.points[..., TIP, :]

    @property
    def approach(self) -> np.ndarray:
        return self.rotation[..., :, 0]

    @property
    def jaw_axis(self) -> np.ndarray:
        return self.rotation[..., :, 1]

    def grasp_center(self, geometry: ArmGeometry) -> np.ndarray:
        """Point between the jaw pads, where a grasped object's centre sits."""
        return self.tip - geometry.grasp_depth * self.approach

    def jaw_tips(self) -> tuple[np.ndarray, np.ndarray]:
        """The two jaw tip positions (left/right along the jaw axis)."""
        half = (0.5 * self.jaw_gap)[..., None] * self.jaw_axis
        return self.tip + half, self.tip - half


def approach_pitch_deg(joints: np.ndarray) -> np.ndarray:
    """Elevation of the gripper's approach axis above horizontal, degrees (-90 = pointing down)."""
    q = np.asarray(joints, dtype=float)
    return -(q[..., 1] + q[..., 2] + q[..., 3])


def _link_angles(q: np.ndarray) -> np.ndarray:
    """(..., 4) downward rotation of upper arm, forearm, wrist, gripper from the calibration pose, radians."""
    lift, elbow, wrist = q[..., 1], q[..., 2], q[..., 3]
    return np.radians(np.stack([lift, lift + elbow, lift + elbow + wrist, lift + elbow + wrist], axis=-1))


def _planar_links(q: np.ndarray, geometry: ArmGeometry) -> np.ndarray:
    """(..., 4, 2) link vectors (forward, up) in the arm plane for joints q."""
    angle = _link_angles(q)
    cos_a, sin_a = np.cos(angle), np.sin(angle)
    forward_0, up_0 = geometry.links[:, 0], geometry.links[:, 1]
    # rotating a (forward, up) vector down by a: forward' = f cos a + u sin a, up' = u cos a - f sin a
    return np.stack([forward_0 * cos_a + up_0 * sin_a, up_0 * cos_a - forward_0 * sin_a], axis=-1)


def forward(joints: np.ndarray, geometry: ArmGeometry = SO101) -> ArmPose:
    """Forward kinematics of joint vectors shaped (..., 6) in normalized units."""
    q = np.asarray(joints, dtype=float)
    if q.shape[-1] != N_JOINTS:
        raise ValueError(f"expected joint vectors of {N_JOINTS} values, got shape {q.shape}")
    pan = -np.radians(q[..., 0])  # positive pan turns clockwise seen from above
    cos_pan, sin_pan = np.cos(pan), np.sin(pan)
    zeros = np.zeros_like(pan)
    radial = np.stack([cos_pan, sin_pan, zeros], axis=-1)
    lateral = np.stack([-sin_pan, cos_pan, zeros], axis=-1)
    up = np.broadcast_to(np.array([0.0, 0.0, 1.0]), radial.shape)

    planar = np.concatenate(
        [np.broadcast_to(np.array(geometry.shoulder), q.shape[:-1] + (1, 2)), _planar_links(q, geometry)], axis=-2
    )
    chain = np.cumsum(planar, axis=-2)  # (..., 5, 2): shoulder, elbow, wrist, jaw pivot, tip
    points = chain[..., 0:1] * radial[..., None, :] + chain[..., 1:2] * up[..., None, :]
    points = np.concatenate([np.zeros_like(radial)[..., None, :], points], axis=-2)

    pitch = np.radians(approach_pitch_deg(q))
    approach = np.cos(pitch)[..., None] * radial + np.sin(pitch)[..., None] * up
    gripper_up = np.cross(approach, lateral)
    roll = np.radians(q[..., 4])
    cos_r, sin_r = np.cos(roll)[..., None], np.sin(roll)[..., None]
    jaw_axis = cos_r * lateral + sin_r * gripper_up
    up_axis = -sin_r * lateral + cos_r * gripper_up
    rotation = np.stack([approach, jaw_axis, up_axis], axis=-1)
    jaw_gap = np.clip(q[..., 5], 0.0, 100.0) / 100.0 * geometry.max_jaw_gap
    return ArmPose(points=points, rotation=rotation, jaw_gap=jaw_gap)


def approach_direction(position: np.ndarray, pitch_deg: float) -> np.ndarray:
    """Unit approach axis of a gripper reaching ``position`` with the given pitch.

    The whole arm lies in the vertical plane through the pan axis, so the approach axis is that plane's
    horizontal direction towards ``position`` tilted by the pitch.
    """
    pan = np.arctan2(position[1], position[0])
    pitch = np.radians(pitch_deg)
    return np.array([np.cos(pitch) * np.cos(pan), np.cos(pitch) * np.sin(pan), np.sin(pitch)])


def tip_for_grasp_center(grasp_center: np.ndarray, pitch_deg: float, geometry: ArmGeometry = SO101) -> np.ndarray:
    """Where the tip must be for the jaw pads to hold ``grasp_center`` at this pitch (IK takes tips)."""
    center = np.asarray(grasp_center, dtype=float)
    return center + geometry.grasp_depth * approach_direction(center, pitch_deg)


@dataclass(frozen=True)
class IKResult:
    joints: np.ndarray  # (6,) normalized units, clamped to the joint range
    position_error: float  # metres, tip to target
    pitch_error: float  # degrees
    converged: bool


# IK task vector = (tip x, y, z, pitch); the pitch residual is weighted so 1 degree counts like 2 mm.
_PITCH_WEIGHT = 0.002
_IK_JOINTS = slice(0, 4)  # pan, lift, elbow, wrist_flex; roll and gripper pass through
_DEG = np.pi / 180.0


def _task_and_jacobian(joints: np.ndarray, geometry: ArmGeometry) -> tuple[np.ndarray, np.ndarray]:
    """Task vector (4,) and its analytic Jacobian (4, 4) w.r.t. pan/lift/elbow/wrist_flex (per degree).

    The same planar chain as ``forward`` without the frames, cheap enough for every IK iteration.
    """
    planar = _planar_links(joints, geometry)  # (4, 2)
    radius = geometry.shoulder[0] + planar[:, 0].sum()
    height = geometry.shoulder[1] + planar[:, 1].sum()
    pan = -joints[0] * _DEG
    cos_p, sin_p = np.cos(pan), np.sin(pan)
    task = np.array([radius * cos_p, radius * sin_p, height, _PITCH_WEIGHT * approach_pitch_deg(joints)])
    # turning lift/elbow/wrist rotates every link from that joint outwards down: d(forward, up) = (up, -forward)
    outward = np.cumsum(planar[::-1], axis=0)[::-1][:3] * _DEG  # links from lift, elbow, wrist onwards
    jacobian = np.zeros((4, 4))
    jacobian[:, 0] = [radius * sin_p * _DEG, -radius * cos_p * _DEG, 0.0, 0.0]
    jacobian[0, 1:] = outward[:, 1] * cos_p
    jacobian[1, 1:] = outward[:, 1] * sin_p
    jacobian[2, 1:] = -outward[:, 0]
    jacobian[3, 1:] = -_PITCH_WEIGHT
    return task, jacobian


def solve_ik(
    target: np.ndarray,
    pitch_deg: float,
    initial: np.ndarray,
    geometry: ArmGeometry = SO101,
    *,
    damping: float = 2e-4,
    tolerance: float = 2e-4,
    max_iterations: int = 60,
) -> IKResult:
    """Joints that put the tip at ``target`` (metres) with the given approach pitch.

    Damped least squares from ``initial`` (warm start: pass the previous solution for smooth trajectories),
    on pan/lift/elbow/wrist_flex with the chain's analytic Jacobian; wrist_roll and gripper are copied from
    ``initial``. The damping keeps steps bounded near singularities and for unreachable targets, where the
    result is the closest reachable pose (``converged`` False).
    """
    goal = np.concatenate([np.asarray(target, dtype=float), [_PITCH_WEIGHT * pitch_deg]])
    q = np.clip(np.asarray(initial, dtype=float).copy(), JOINT_LOWER, JOINT_UPPER)
    # the arm moves in the vertical plane through the pan axis, so pan has a closed form; seeding it keeps the
    # iteration from wandering to the far side of the pan range
    if np.hypot(goal[0], goal[1]) > 1e-6:
        q[0] = np.clip(-np.degrees(np.arctan2(goal[1], goal[0])), JOINT_LOWER[0], JOINT_UPPER[0])
    for _ in range(max_iterations):
        task, jacobian = _task_and_jacobian(q, geometry)
        error = goal - task
        if np.linalg.norm(error[:3]) < tolerance and abs(error[3]) < _PITCH_WEIGHT * 0.2:
            break
        jjt = jacobian @ jacobian.T + (damping**2) * np.eye(4)
        dq = jacobian.T @ np.linalg.solve(jjt, error)
        # cap the step so a far target does not fling the linearisation out of its valid region
        dq *= min(1.0, 20.0 / max(np.abs(dq).max(), 1e-12))
        q[_IK_JOINTS] = np.clip(q[_IK_JOINTS] + dq, JOINT_LOWER[_IK_JOINTS], JOINT_UPPER[_IK_JOINTS])
    error = goal - _task_and_jacobian(q, geometry)[0]
    position_error = float(np.linalg.norm(error[:3]))
    pitch_error = float(abs(error[3]) / _PITCH_WEIGHT)
    return IKResult(
        joints=q,
        position_error=position_error,
        pitch_error=pitch_error,
        converged=position_error < 2 * tolerance and pitch_error < 1.0,
    )
