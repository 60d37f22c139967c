"""Camera renderer: image format, and that images follow the arm, the gripper and the objects."""

import numpy as np
import pytest

from zk0.hw.sim.render import CAMERA_NAMES, CameraRenderer
from zk0.hw.sim.world import World

REACHING = np.array([10.0, 35.0, -20.0, 70.0, 0.0, 60.0])


def changed_fraction(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.any(a != b, axis=-1).mean())


@pytest.mark.parametrize("name", CAMERA_NAMES)
@pytest.mark.parametrize("size", [(640, 480), (320, 240)])
def test_frames_are_rgb_uint8_of_the_requested_size(name, size):
    world = World("pick_place_red", 0)
    world.step(REACHING, 0.03)
    image = CameraRenderer(name, *size).render(world)
    assert image.shape == (size[1], size[0], 3) and image.dtype == np.uint8
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 20  # a scene, not a blank frame


def test_same_state_same_frame():
    world = World("push_blue_left", 1)
    world.step(REACHING, 0.03)
    for name in CAMERA_NAMES:
        renderer = CameraRenderer(name, 320, 240)
        np.testing.assert_array_equal(renderer.render(world), renderer.render(world))


@pytest.mark.parametrize("name", CAMERA_NAMES)
def test_frames_follow_the_arm(name):
    world = World("pick_place_red", 2)
    renderer = CameraRenderer(name, 320, 240)
    world.step(REACHING, 0.03)
    before = renderer.render(world)
    world.step(REACHING + [8.0, 4.0, 0.0, 0.0, 0.0, 0.0], 0.03)
    assert changed_fraction(before, renderer.render(world)) > 0.01


@pytest.mark.parametrize("name", ["front", "wrist"])
def test_gripper_opening_is_visible(name):
    world = World("pick_place_red", 3)
    renderer = CameraRenderer(name, 320, 240)
    world.step(np.append(REACHING[:5], 0.0), 0.03)
    closed = renderer.render(world)
    world.step(np.append(REACHING[:5], 100.0), 0.03)
    assert changed_fraction(closed, renderer.render(world)) > 0.001


@pytest.mark.parametrize("name", ["front", "top"])
def test_fixed_views_follow_the_objects_but_not_the_episode_clock(name):
    world = World("pick_place_red", 4)
    world.step(np.zeros(6), 0.03)
    renderer = CameraRenderer(name, 320, 240)
    before = renderer.render(world)
    world.cubes["green"].position = world.cubes["green"].position + [0.03, 0.03, 0.0]
    moved = renderer.render(world)
    assert changed_fraction(before, moved) > 0.002
    world.step(np.zeros(6), 0.03)
    np.testing.assert_array_equal(moved, renderer.render(world))


def test_wrist_view_sees_the_cube_it_hovers_over():
    """Over a cube with the gripper down, the cube's colour fills part of the middle of the wrist image."""
    from zk0.hw import kinematics
    from zk0.hw.sim.operator import approach_pitch_for

    world = World("pick_place_blue", 5)
    target = world.cubes["blue"].position + [0.0, 0.0, 0.06]
    pitch = approach_pitch_for(target)
    tip = kinematics.tip_for_grasp_center(target, pitch)
    world.step(kinematics.solve_ik(tip, pitch, np.array([0, 0, 0, 0, 0, 80.0])).joints, 0.03)
    image = CameraRenderer("wrist", 320, 240).render(world).astype(int)
    blue = (image[..., 2] > 150) & (image[..., 0] < 80) & (image[..., 1] < 120)
    assert blue[60:240, 80:240].mean() > 0.02


def test_bad_camera_arguments():
    with pytest.raises(ValueError, match="unknown camera"):
        CameraRenderer("side")
    with pytest.raises(ValueError, match="too small"):
        CameraRenderer("front", 8, 8)
