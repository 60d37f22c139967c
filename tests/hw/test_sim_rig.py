"""The rig process (`zk0 sim rig`) through lerobot: arms, ZMQ cameras, control API, faults, scripted episodes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from lerobot.cameras.zmq import ZMQCamera
from lerobot.robots.utils import make_robot_from_config
from lerobot.teleoperators.utils import make_teleoperator_from_config

from zk0.hw.config import ArmConfig, CameraConfig
from zk0.hw.robots import connect_without_prompt, make_follower
from zk0.hw.sim.cameras import subscription_count
from zk0.hw.sim.feetech_protocol import ERRBIT_OVERHEAT
from zk0.hw.sim.rig_handle import RigError, RigHandle, rig_serves, teleoperate_episode
from zk0.hw.sim.tasks import TASKS
from tests.hw.conftest import connect_retrying


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    trace = tmp_path_factory.mktemp("trace") / "bus.jsonl"
    with RigHandle.start(calibration_dir=tmp_path_factory.mktemp("calibration"), width=160, height=120,
                         bus_trace=trace) as handle:
        yield handle


@pytest.fixture
def follower(rig, monkeypatch):
    monkeypatch.setattr("builtins.input", lambda *_: pytest.fail("lerobot asked for interactive calibration"))
    robot = make_robot_from_config(rig.follower_config(with_cameras=False))
    connect_retrying(robot)
    yield robot
    rig.inject_faults("follower")  # clear whatever the test injected before disconnecting
    robot.disconnect()


def move_and_wait(robot, target: dict[str, float], timeout: float = 3.0) -> dict[str, float]:
    robot.send_action(target)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        observation = robot.get_observation()
        if all(abs(observation[key] - value) < 1.0 for key, value in target.items()):
            break
        time.sleep(0.03)
    return observation


def test_world_follows_the_follower_and_cameras_see_it(rig, follower):
    rig.reset("pick_place_red", seed=1)
    camera = ZMQCamera(rig.camera_configs()["front"])
    camera.connect()
    try:
        before = camera.read().astype(int)
        assert before.shape == (120, 160, 3)
        observation = move_and_wait(follower, {"shoulder_pan.pos": 40.0, "shoulder_lift.pos": 30.0})
        assert abs(observation["shoulder_pan.pos"] - 40.0) < 1.0
        # the world steps on its own clock: it may still be a tick behind the servo that was just read
        deadline = time.monotonic() + 2.0
        while abs(rig.snapshot()["joints"][0] - 40.0) >= 1.5 and time.monotonic() < deadline:
            time.sleep(0.03)
        assert abs(rig.snapshot()["joints"][0] - 40.0) < 1.5
        time.sleep(0.3)  # a few camera periods
        after = camera.read().astype(int)
        assert np.abs(after - before).mean() > 1.0
    finally:
        camera.disconnect()


def test_injected_faults_surface_as_lerobot_errors_then_clear(rig, follower):
    rig.inject_faults("follower", garble_rate=1.0)
    started = time.monotonic()
    with pytest.raises(ConnectionError):
        follower.get_observation()
    assert time.monotonic() - started < 3.0
    rig.inject_faults("follower", drop_next=2)
    assert "gripper.pos" in follower.get_observation()  # two dropped replies are absorbed by lerobot's retries
    rig.inject_faults("follower", error_bits={2: ERRBIT_OVERHEAT})
    with pytest.raises(RuntimeError, match="Overheat"):
        follower.bus.read("Present_Temperature", "shoulder_lift")


def test_bus_trace_names_the_arm(rig, follower, monkeypatch):
    from tests.hw.test_bus_trace import read_trace

    leader = make_teleoperator_from_config(rig.leader_config())
    connect_retrying(leader)  # configuring a leader turns its torque off
    leader.disconnect()
    follower.send_action({"wrist_roll.pos": 10.0})
    path = Path(rig.info["bus_trace"])

    def wrist_goal_sent(lines: list[dict]) -> bool:
        return any(line["arm"] == "follower" and line["id"] == 5 and line["register"] == "Goal_Position" for line in lines)

    deadline, lines = time.monotonic() + 2.0, []
    while time.monotonic() < deadline and not wrist_goal_sent(lines):
        lines = read_trace(path, len(lines) + 1)
    assert wrist_goal_sent(lines)
    assert {(line["id"], line["register"], line["value"]) for line in lines if line["arm"] == "leader"} == {
        (servo_id, "Torque_Enable", 0) for servo_id in range(1, 7)}


def test_bad_requests_are_refused(rig):
    with pytest.raises(RigError, match="unknown rig command"):
        rig.request("dance")
    with pytest.raises(RigError, match="unknown fault fields"):
        rig.inject_faults("follower", melt=True)


def test_attached_clients_share_the_rig_and_leave_it_running(rig, tmp_path):
    description = tmp_path / "rig.json"
    description.write_text(json.dumps(rig.info))
    served = {"robot": "so101", "cameras": ("front", "wrist"), "fps": 30, "width": 160, "height": 120}
    attached = RigHandle.attach(description, **served)
    assert attached is not None and attached.process is None
    assert attached.reset("pick_place_red", seed=3)["task"] == rig.snapshot()["task"]
    attached.close()
    assert rig.process.poll() is None and rig.snapshot()  # closing a client of someone else's rig leaves it running

    assert RigHandle.attach(description, **{**served, "width": 320}) is None  # built for another config
    assert RigHandle.attach(tmp_path / "missing.json", **served) is None
    description.write_text(json.dumps({**rig.info, "control": "tcp://127.0.0.1:9"}))  # nobody answers there
    assert RigHandle.attach(description, **served) is None


def test_rig_serves_compares_robot_rate_and_cameras():
    info = {"robot": "so101", "fps": 30, "cameras": [{"name": "front", "width": 640, "height": 480}]}
    assert rig_serves(info, "so101", ("front",), 30, 640, 480)
    assert not rig_serves(info, "so100", ("front",), 30, 640, 480)
    assert not rig_serves(info, "so101", ("front", "wrist"), 30, 640, 480)
    assert not rig_serves(info, "so101", ("front",), 15, 640, 480)


def test_camera_subscribers_are_counted_from_xpub_messages():
    count = 0
    for message in (b"\x01", b"\x01", b"\x00", b"\x02junk"):
        count = subscription_count(count, message)
    assert count == 1
    assert subscription_count(0, b"\x00") == 0


def test_follower_with_stream_cameras_connects_at_their_first_frame(rig, monkeypatch):
    monkeypatch.setattr("builtins.input", lambda *_: pytest.fail("lerobot asked for interactive calibration"))
    cameras = [CameraConfig(name=name, type="zmq", width=c.width, height=c.height, fps=c.fps, host=c.server_address,
                            port=c.port) for name, c in rig.camera_configs().items()]
    robot = make_follower(ArmConfig(rig.follower_port, rig.info["follower_id"], rig.calibration_dir), cameras, 3)
    started = time.monotonic()
    connect_without_prompt(robot)
    try:
        # lerobot's own warmup reads each camera for a whole second; this waits for a frame from each
        assert time.monotonic() - started < 2.0
        assert robot.is_connected
        observation = robot.get_observation()
        assert observation["front"].shape == observation["wrist"].shape == (120, 160, 3)
    finally:
        robot.disconnect()


@pytest.mark.slow
def test_scripted_operator_completes_tasks_through_lerobot(rig, monkeypatch):
    """20 seeded episodes over all tasks, leader -> follower at 30 fps through lerobot: >= 90% succeed."""
    monkeypatch.setattr("builtins.input", lambda *_: pytest.fail("lerobot asked for interactive calibration"))
    robot = make_robot_from_config(rig.follower_config(with_cameras=False))
    leader = make_teleoperator_from_config(rig.leader_config())
    connect_retrying(robot)
    connect_retrying(leader)
    tasks = list(TASKS)
    try:
        results = [
            teleoperate_episode(rig, robot, leader, tasks[seed % len(tasks)], seed, fps=30, timeout_s=30.0)
            for seed in range(20)
        ]
    finally:
        robot.disconnect()
        leader.disconnect()
    successes = sum(result.success for result in results)
    assert successes >= 18, [(tasks[i % len(tasks)], r.success) for i, r in enumerate(results)]
