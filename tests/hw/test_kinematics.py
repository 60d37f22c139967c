"""SO-101 forward kinematics and damped-least-squares IK."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zk0.hw import kinematics as k

G = k.SO101


def test_calibration_pose_matches_the_so101_urdf():
    """Keypoints at all-zero joints and after +30 deg on one joint, from so101_new_calib.urdf's transforms
    (expressed relative to the pan axis at table height, x forward, y left)."""
    pose = k.forward(np.zeros(6))
    np.testing.assert_allclose(pose.points[k.SHOULDER], [0.0304, 0, 0.1491], atol=1e-4)
    np.testing.assert_allclose(pose.points[k.ELBOW], [0.0584, 0, 0.2617], atol=1e-4)
    np.testing.assert_allclose(pose.tip, [0.3525, 0, 0.2590], atol=1e-4)
    np.testing.assert_allclose(pose.approach, [1, 0, 0], atol=1e-12)
    urdf_tips = {
        0: [0.3051, -0.1766, 0.2590],  # pan turns the arm to its right (the URDF's 18 mm offsets: 0.5 mm)
        1: [0.3643, 0.0, 0.0832],
        2: [0.3117, 0.0, 0.1122],
        3: [0.3272, 0.0, 0.1804],
    }
    for joint, tip in urdf_tips.items():
        q = np.zeros(6)
        q[joint] = 30.0
        np.testing.assert_allclose(k.forward(q).tip, tip, atol=6e-4)


def test_lift_tilts_forward_and_folded_links_keep_their_lengths():
    forward_tilt = k.forward(np.array([0, 90.0, 0, 0, 0, 0]))
    np.testing.assert_allclose(forward_tilt.approach, [0, 0, -1], atol=1e-12)
    assert k.approach_pitch_deg(np.array([0, 90.0, 0, 0, 0, 0])) == -90
    rng = np.random.default_rng(0)
    q = rng.uniform(k.JOINT_LOWER, k.JOINT_UPPER, size=(200, 6))
    points = k.forward(q).points
    lengths = np.linalg.norm(np.diff(points[:, 1:], axis=1), axis=-1)
    expected = np.linalg.norm(G.links, axis=1)
    np.testing.assert_allclose(lengths, np.broadcast_to(expected, (200, 4)))


def test_batched_forward_matches_single_calls():
    rng = np.random.default_rng(1)
    q = rng.uniform(k.JOINT_LOWER, k.JOINT_UPPER, size=(4, 3, 6))
    batch = k.forward(q)
    assert batch.points.shape == (4, 3, 6, 3) and batch.rotation.shape == (4, 3, 3, 3)
    single = k.forward(q[2, 1])
    np.testing.assert_allclose(batch.points[2, 1], single.points)
    np.testing.assert_allclose(batch.rotation[2, 1], single.rotation)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1, 1), min_size=6, max_size=6))
def test_gripper_frame_is_a_rotation_whose_approach_has_the_pitch(unit):
    q = k.JOINT_LOWER + (np.array(unit) + 1) / 2 * (k.JOINT_UPPER - k.JOINT_LOWER)
    pose = k.forward(q)
    np.testing.assert_allclose(pose.rotation.T @ pose.rotation, np.eye(3), atol=1e-12)
    assert np.linalg.det(pose.rotation) == pytest.approx(1.0)
    assert pose.approach[2] == pytest.approx(np.sin(np.radians(k.approach_pitch_deg(q))))


def test_gripper_maps_linearly_to_jaw_gap():
    gaps = k.forward(np.array([[0, 0, 0, 0, 0, g] for g in (0.0, 50.0, 100.0)])).jaw_gap
    np.testing.assert_allclose(gaps, [0, G.max_jaw_gap / 2, G.max_jaw_gap])
    left, right = k.forward(np.array([0, 0, 0, 0, 0, 100.0])).jaw_tips()
    assert np.linalg.norm(left - right) == pytest.approx(G.max_jaw_gap)


def test_ik_round_trip_over_the_forward_workspace():
    """Poses made by FK from joints (so reachable) in front of the robot are recovered from a cold start."""
    rng = np.random.default_rng(2)
    checked = 0
    while checked < 300:
        q = np.zeros(6)
        q[:4] = rng.uniform([-100, -30, -60, -20], [100, 70, 80, 100])
        pose = k.forward(q)
        pitch = float(k.approach_pitch_deg(q))
        radius = np.hypot(pose.tip[0], pose.tip[1])
        if not (-150 < pitch < 30 and radius > 0.1 and pose.tip[2] > 0 and np.dot(pose.tip[:2], pose.points[k.SHOULDER, :2]) > 0):
            continue
        checked += 1
        result = k.solve_ik(pose.tip, pitch, np.zeros(6))
        assert result.converged, (q, result)
        np.testing.assert_allclose(k.forward(result.joints).tip, pose.tip, atol=5e-4)
        assert k.approach_pitch_deg(result.joints) == pytest.approx(pitch, abs=0.3)
        assert np.all(result.joints >= k.JOINT_LOWER) and np.all(result.joints <= k.JOINT_UPPER)


def test_ik_warm_start_tracks_a_path_smoothly():
    """Consecutive targets 2 mm apart give joint steps of a degree or two: no branch flips mid-trajectory."""
    def path(y: float) -> np.ndarray:
        return np.array([0.2, y, 0.05 + 0.3 * y**2])

    joints = k.solve_ik(path(-0.1), -80.0, np.zeros(6)).joints
    for y in np.arange(-0.1, 0.1, 0.002):
        result = k.solve_ik(path(y), -80.0, joints)
        assert result.converged
        assert np.abs(result.joints - joints).max() < 2.0
        joints = result.joints


def test_ik_keeps_roll_and_gripper_and_reports_unreachable_targets():
    initial = np.array([0, 0, 0, 0, 30.0, 55.0])
    result = k.solve_ik(np.array([0.2, 0.0, 0.05]), -90.0, initial)
    assert result.joints[4] == 30.0 and result.joints[5] == 55.0
    too_far = k.solve_ik(np.array([0.8, 0.0, 0.05]), -90.0, initial)
    assert not too_far.converged and too_far.position_error > 0.2


def test_geometry_lookup():
    assert k.geometry_for("so101_follower") is k.SO101
    assert k.geometry_for("SO100") is k.SO100
    with pytest.raises(ValueError, match="unknown arm"):
        k.geometry_for("ur5")
