"""zk0.hw.sim.lockstep: the world advances one control tick per command, through the STS3215 motion model."""

from __future__ import annotations

import numpy as np
import pytest

from zk0.hw.sim.feetech import MAX_SPEED_TICKS_S
from zk0.hw.sim.lockstep import LockstepSim, follower_limits
from zk0.hw.sim.rig import HOME_JOINTS

DEG_PER_TICK = 360 / 4095


def test_reset_starts_at_home_with_the_scene_of_the_seed_and_renders_the_asked_sizes():
    sim = LockstepSim({"front": (64, 48), "wrist": (32, 24)}, fps=30)
    sim.reset("pick_place_red", 7)
    observation = sim.observe()
    assert observation.t == 0.0 and sim.ticks == 0
    assert observation.joints == pytest.approx(HOME_JOINTS, abs=DEG_PER_TICK)
    assert {name: image.shape for name, image in observation.images.items()} == {"front": (48, 64, 3),
                                                                                  "wrist": (24, 32, 3)}
    red = sim.world.cubes["red"].position.copy()
    sim.reset("pick_place_red", 8)
    sim.reset("pick_place_red", 7)
    assert sim.world.cubes["red"].position == pytest.approx(red)


def test_a_goal_is_reached_through_the_servo_motion_model_not_at_once():
    sim = LockstepSim({}, fps=30)
    sim.reset("push_blue_left", 0)
    goal = HOME_JOINTS + np.array([60.0, 0, 0, 0, 0, 0])
    pans = []
    for _ in range(30):
        sim.step(goal)
        pans.append(sim.present()[0])
    per_tick = np.diff([0.0, *pans])
    top_speed = MAX_SPEED_TICKS_S * DEG_PER_TICK / 30
    assert per_tick[0] < 0.5 * top_speed  # it accelerates
    assert per_tick.max() <= top_speed + 1e-6  # never faster than the servo
    assert pans[-1] == pytest.approx(60.0, abs=DEG_PER_TICK)  # and arrives within a tick of resolution
    assert sim.t == pytest.approx(1.0) and sim.world.time == pytest.approx(1.0)


def test_same_commands_same_world_whatever_ran_before():
    def run(sim: LockstepSim) -> list:
        sim.reset("pick_place_blue", 3)
        trajectory = []
        for tick in range(40):
            sim.step(np.array([20.0, 10.0, -10.0, 30.0, 0.0, 80.0 * (tick < 20)]))
            trajectory.append(np.concatenate([sim.present(), sim.world.pose.tip]))
        return trajectory

    fresh, used = LockstepSim({}, 30), LockstepSim({}, 30)
    used.reset("push_red_left", 99)
    used.step(np.full(6, 40.0))
    assert np.array_equal(run(fresh), run(used))


def test_follower_limits_are_the_calibrated_ranges_in_normalized_units():
    limits = follower_limits()
    assert limits.names == ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")
    assert limits.upper[0] == pytest.approx(1300 * DEG_PER_TICK) and limits.lower[0] == -limits.upper[0]
    assert (limits.lower[5], limits.upper[5]) == (0.0, 100.0)


def test_a_goal_inside_the_table_leaves_the_arm_resting_on_it_and_its_servos_stalled():
    from zk0.hw.kinematics import forward

    sim = LockstepSim({}, fps=30)
    sim.reset("push_red_left", 4)
    into_table = np.array([10.0, 40.0, 30.0, 20.0, 0.0, 0.0])  # the tip would be 6.7 cm below the table
    assert forward(into_table).tip[2] < -0.05
    for _ in range(45):
        sim.step(into_table)
    assert sim.world.pose.tip[2] == pytest.approx(0.0, abs=1e-4)
    # what lerobot would read back is the arm on the table (within a tick of resolution), not the goal
    assert forward(sim.present()).tip[2] == pytest.approx(0.0, abs=2e-3)
    assert sim.present()[0] == pytest.approx(10.0, abs=DEG_PER_TICK)  # the pan got where it was sent
    pressing = sim.table_contact_ticks
    assert 0 < pressing < 45  # from first touch on, every tick
    for _ in range(30):
        sim.step(HOME_JOINTS)
    assert sim.table_contact_ticks == pressing  # sent back up, the stalled servos lift off at once
    assert sim.present() == pytest.approx(HOME_JOINTS, abs=DEG_PER_TICK)


def test_the_real_time_rigs_servos_also_stall_on_the_table(tmp_path) -> None:
    """The rig (what lerobot reads over the pty bus) and the lock-step sim share `stall_at_table`."""
    from zk0.hw.kinematics import forward
    from zk0.hw.sim.calibration import arm_calibration, joints_to_ticks, ticks_to_joints
    from zk0.hw.sim.rig import Rig, RigConfig

    rig = Rig(RigConfig(calibration_dir=tmp_path, cameras=()))  # not started: stepped by hand, no servers
    rig.reset("push_red_left", 4)
    calibration = arm_calibration("follower")
    goal = joints_to_ticks(np.array([10.0, 40.0, 30.0, 20.0, 0.0, 0.0]), calibration)
    with rig.follower.lock:
        for servo_id, value in goal.items():
            rig.follower.servos[servo_id].set("Torque_Enable", 1)
            rig.follower.servos[servo_id].set("Goal_Position", int(round(value)))
    now = 0.0
    for _ in range(300):
        now += 0.005
        rig.step(now, 0.005)
    assert rig.world.pressing_table and rig.world.pose.tip[2] == pytest.approx(0.0, abs=1e-4)
    present = ticks_to_joints(rig.follower.positions(), calibration)
    assert forward(present).tip[2] == pytest.approx(0.0, abs=2e-3)  # read back on the table, not at the goal
