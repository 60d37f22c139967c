"""World seeding, grasp/release/push model, task predicates, snapshots."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zk0.hw import kinematics as k
from zk0.hw.sim.operator import approach_pitch_for
from zk0.hw.sim.tasks import CUBE_SIZE, MIN_CUBE_SEPARATION, TASKS, get_task
from zk0.hw.sim.world import World, lowest_point, stop_at_table


def joints_with_grasp_center_at(world: World, point: np.ndarray, gripper: float) -> np.ndarray:
    point = np.asarray(point, dtype=float)
    pitch = approach_pitch_for(point)  # top-down where the arm can, tilted further out
    initial = np.append(world.joints[:5], gripper)
    result = k.solve_ik(k.tip_for_grasp_center(point, pitch, world.geometry), pitch, initial, world.geometry)
    assert result.converged
    np.testing.assert_allclose(k.forward(result.joints, world.geometry).grasp_center(world.geometry), point, atol=1e-3)
    return result.joints


def move(world: World, point: np.ndarray, gripper: float, steps: int = 5) -> None:
    for _ in range(steps):
        world.step(joints_with_grasp_center_at(world, point, gripper), 1 / 30)


# Top-down, the grasp centre sits this far above a resting cube's centre so the jaw tips clear the table by
# 3 mm, as the scripted operator grasps (the table stops a tip commanded lower).
GRIP_LIFT = 0.006


def close_gripper(world: World, point: np.ndarray, start: float = 80.0) -> None:
    for gripper in np.linspace(start, 0.0, 15):
        world.step(joints_with_grasp_center_at(world, point, gripper), 1 / 30)


@pytest.mark.parametrize("task", list(TASKS))
def test_same_seed_same_scene_and_scenes_are_valid(task):
    layouts = []
    for seed in range(60):
        world = World(task, seed)
        again = World(task, seed)
        assert json.dumps(world.snapshot()) == json.dumps(again.snapshot())
        centres = np.array([c.position[:2] for c in world.cubes.values()])
        gaps = np.linalg.norm(centres[:, None] - centres[None], axis=-1) + np.eye(len(centres))
        assert gaps.min() >= MIN_CUBE_SEPARATION
        assert all(not world.scene.bin.contains_xy(c.position, margin=-0.02) for c in world.cubes.values())
        assert not world.success()
        layouts.append(centres.round(4).tobytes())
    assert len(set(layouts)) == 60  # seeds actually vary the scene


def test_reset_replaces_the_scene_and_keeps_the_arm():
    world = World("pick_place_red", 1)
    move(world, world.cubes["red"].position + [0, 0, 0.1], 50.0)
    arm = world.joints.copy()
    world.reset("push_green_right", 2)
    assert world.task.name == "push_green_right" and world.seed == 2 and world.time == 0.0
    np.testing.assert_array_equal(world.joints, arm)


def test_closing_around_a_cube_grasps_it_and_lifting_carries_it():
    world = World("pick_place_red", 3)
    cube = world.cubes["red"]
    start = cube.position.copy()
    grip = start + [0, 0, GRIP_LIFT]
    move(world, start + [0, 0, 0.08], 80.0)
    move(world, grip, 80.0)
    assert world.held is None
    close_gripper(world, grip)
    assert world.held == "red" and cube.held
    lifted = grip + [0.02, 0.01, 0.1]
    move(world, lifted, 0.0, steps=10)
    np.testing.assert_allclose(world.pose.grasp_center(world.geometry), lifted, atol=2e-3)
    # gripped top-down GRIP_LIFT below the grasp centre, the cube rides there along the approach axis as it tilts
    offset = cube.position - world.pose.grasp_center(world.geometry)
    np.testing.assert_allclose(offset, GRIP_LIFT * world.pose.approach, atol=2e-3)
    assert world.table_contacts == 0
    assert json.loads(json.dumps(world.snapshot()))["held"] == "red"


def test_opening_drops_the_cube_onto_the_table_or_into_the_bin():
    world = World("pick_place_red", 4)
    cube = world.cubes["red"]
    start = cube.position.copy()
    move(world, start + [0, 0, GRIP_LIFT], 80.0)
    close_gripper(world, start + [0, 0, GRIP_LIFT])
    above_table = start + [0.0, 0.04, 0.08]
    move(world, above_table, 0.0)
    move(world, above_table, 60.0, steps=20)  # falling 8 cm takes about 0.13 s
    assert world.held is None and world.scene.on_table("red")
    np.testing.assert_allclose(cube.position[:2], above_table[:2], atol=2e-3)
    assert not world.success()

    close_gripper(world, cube.position.copy() + [0, 0, GRIP_LIFT])
    assert world.held == "red"
    over_bin = np.array([*world.scene.bin.center, 0.09])
    move(world, over_bin, 0.0, steps=10)
    assert not world.success()  # held above the bin does not count
    move(world, over_bin, 60.0, steps=20)
    assert world.scene.in_bin("red") and world.success()
    assert cube.position[2] == pytest.approx(world.scene.bin.floor_height + CUBE_SIZE / 2)


def test_no_grasp_when_the_cube_is_not_between_the_jaws_or_the_jaws_were_already_shut():
    world = World("pick_place_blue", 5)
    start = world.cubes["blue"].position.copy()
    beside = start + [0.0, 0.0, 0.04]  # jaws close in the air above the cube
    move(world, beside, 80.0)
    close_gripper(world, beside)
    assert world.held is None
    move(world, start, 0.0)  # coming down already closed: pushes, never grasps
    assert world.held is None


def test_closed_gripper_pushes_a_cube_along_the_stroke_and_open_one_does_not():
    world = World("push_blue_left", 6)
    cube = world.cubes["blue"]
    start = cube.position.copy()
    height = 0.012 + world.geometry.grasp_depth  # tip 12 mm above the table
    behind = start + [0.0, -0.04, height - start[2]]
    move(world, behind + [0, 0, 0.05], 0.0)
    move(world, behind, 0.0)
    for y in np.linspace(behind[1], behind[1] + 0.09, 45):
        world.step(joints_with_grasp_center_at(world, np.array([behind[0], y, behind[2]]), 0.0), 1 / 30)
    assert cube.position[1] - start[1] == pytest.approx(0.09 - 0.04 + 0.015 + 0.012, abs=2e-3)
    assert cube.position[0] == pytest.approx(start[0], abs=1e-3) and world.scene.on_table("blue")
    assert world.success()

    other = World("push_blue_left", 6)
    other.step(joints_with_grasp_center_at(other, behind + [0, 0, 0.05], 100.0), 1 / 30)
    for y in np.linspace(behind[1], behind[1] + 0.09, 45):
        other.step(joints_with_grasp_center_at(other, np.array([behind[0], y, behind[2]]), 100.0), 1 / 30)
    np.testing.assert_allclose(other.cubes["blue"].position, start)
    assert not other.success()


def test_predicates_on_constructed_scenes():
    pick = World("pick_place_green", 7)
    green = pick.cubes["green"]
    green.position = np.array([*pick.scene.bin.center, pick.scene.bin.floor_height + CUBE_SIZE / 2])
    assert pick.success()
    green.held = True
    assert not pick.success()
    green.held = False
    green.position[0] += pick.scene.bin.inner_size  # beside the bin
    assert not pick.success()

    push = World("push_green_right", 7)
    green = push.cubes["green"]
    green.position = green.position + [0.0, -0.049, 0.0]
    assert not push.success()
    green.position = green.position + [0.0, -0.002, 0.0]
    assert push.success()
    green.position = green.position + [0.0, 0.0, 0.05]  # lifted: not a push
    assert not push.success()


def test_tasks_lookup_and_bad_input():
    assert get_task("push the blue cube left").name == "push_blue_left"
    with pytest.raises(ValueError, match="unknown task"):
        World("juggle", 0)
    with pytest.raises(ValueError, match="6 values"):
        World("pick_place_red", 0).step(np.zeros(5), 0.03)


def test_snapshot_is_json_with_the_episode_state():
    world = World("pick_place_red", 8)
    world.step(np.array([5.0, 10.0, -5.0, 20.0, 0.0, 40.0]), 0.05)
    snap = json.loads(json.dumps(world.snapshot()))
    assert snap["task"] == "pick_place_red" and snap["seed"] == 8 and snap["success"] is False
    assert snap["instruction"] == "pick the red cube and place it in the bin"
    assert snap["joints"] == [5.0, 10.0, -5.0, 20.0, 0.0, 40.0] and snap["time"] == 0.05
    assert {c["color"] for c in snap["cubes"]} == {"red", "green", "blue"}
    assert len(snap["bin"]["center"]) == 2


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.lists(st.lists(st.floats(-1, 1), min_size=6, max_size=6), min_size=1, max_size=40))
def test_any_arm_motion_keeps_cubes_on_or_above_their_support(seed, unit_steps):
    world = World("push_red_left", seed)
    for unit in unit_steps:
        q = k.JOINT_LOWER + (np.array(unit) + 1) / 2 * (k.JOINT_UPPER - k.JOINT_LOWER)
        world.step(q, 1 / 30)
        for cube in world.cubes.values():
            assert np.all(np.isfinite(cube.position))
            assert cube.held or cube.position[2] >= world.scene.resting_height(cube.position, cube.size) - 1e-9
    assert (world.held is None) == all(not c.held for c in world.cubes.values())


def test_the_table_stops_the_arm_and_counts_the_steps_it_pressed_into_it():
    world = World("push_red_left", 9)
    above = np.array([0.2, 0.05, 0.06])
    move(world, above, 0.0)
    assert world.table_contacts == 0 and not world.pressing_table
    into_table = joints_with_grasp_center_at(world, above + [0, 0, -0.08], 0.0)  # tip 2 cm below the table
    assert k.forward(into_table, world.geometry).tip[2] < -0.015
    for _ in range(5):
        world.step(into_table, 1 / 30)
    assert world.pressing_table and world.table_contacts == 5
    assert world.pose.tip[2] == pytest.approx(0.0, abs=1e-4)  # resting on the table, not through it
    assert lowest_point(world.joints, world.geometry) >= 0.0
    panned = into_table + [-15.0, 0, 0, 0, 0, 0]
    world.step(panned, 1 / 30)  # pressing down, the pan still follows: the tip slides along the table
    assert world.joints[0] == pytest.approx(panned[0]) and world.pose.tip[2] == pytest.approx(0.0, abs=1e-4)
    move(world, above, 0.0)  # commanded back up, it leaves the table
    assert not world.pressing_table and world.table_contacts == 6
    assert json.loads(json.dumps(world.snapshot()))["table_contacts"] == 6


@pytest.mark.parametrize(("previous", "commanded"), [
    ([0, 0, 0, 0, 0, 0], [10, 20, 30, 40, 5, 50]),  # above the table all the way
    ([0, 0, 0, 0, 0, 0], [0, 60, 60, 60, 0, 0]),  # folded down through it
    ([30, 20, 40, 50, 0, 0], [30, 90, 90, 90, 0, 0]),
])
def test_stop_at_table_keeps_every_keypoint_on_or_above_it(previous, commanded):
    previous, commanded = np.array(previous, float), np.array(commanded, float)
    stopped, pressing = stop_at_table(previous, commanded, k.SO101)
    assert pressing == (lowest_point(commanded, k.SO101) < 0)
    assert lowest_point(stopped, k.SO101) >= 0.0
    np.testing.assert_array_equal(stopped[[0, 4, 5]], commanded[[0, 4, 5]])  # pan, roll, gripper never stopped
    if pressing:  # stopped where it touched: a little further would be inside the table
        assert lowest_point(stopped, k.SO101) < 1e-3
    else:
        np.testing.assert_array_equal(stopped, commanded)


def test_a_tip_that_catches_only_a_corner_pushes_the_cube_aside_not_ahead():
    world = World("push_blue_left", 6)
    cube = world.cubes["blue"]
    start = cube.position.copy()
    height = 0.012 + world.geometry.grasp_depth
    beside = start + [CUBE_SIZE / 2 + 0.006, -0.04, height - start[2]]  # the tip's disc overlaps the corner only
    move(world, beside + [0, 0, 0.05], 0.0)
    move(world, beside, 0.0)
    for y in np.linspace(beside[1], beside[1] + 0.09, 45):
        world.step(joints_with_grasp_center_at(world, np.array([beside[0], y, beside[2]]), 0.0), 1 / 30)
    moved = cube.position - start
    assert moved[0] < -0.004  # away from the tip's line
    assert 0.0 < moved[1] < 0.02  # and only a little along it: the tip slid past
    assert not world.success()


def test_an_arm_constructed_below_the_table_may_rise_but_not_sink():
    below = np.array([10.0, 40.0, 30.0, 20.0, 0.0, 0.0])  # tip 6.7 cm under the table
    deeper, higher = below + [0, 5.0, 0, 0, 0, 0], below - [0, 5.0, 0, 0, 0, 0]
    stopped, pressing = stop_at_table(below, deeper, k.SO101)
    assert pressing and lowest_point(stopped, k.SO101) >= lowest_point(below, k.SO101) - 1e-6
    stopped, pressing = stop_at_table(below, higher, k.SO101)
    assert pressing and np.array_equal(stopped, higher)
