"""The agent's hardware check before READY=1 (zk0.agent.readiness): the pure decisions with the design's numbers,
and the probes against simulated hardware (a Feetech bus on a real pty, a camera stream in lerobot's ZMQ format),
through lerobot's own bus and camera classes. `zk0 agent --sim` runs the whole check, as a child process, before
every READY in tests/e2e/test_agent.py."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq

from tests.hw.conftest import responsive_bus_threads  # noqa: F401 (autouse: in-process bus servers answer in time)
from zk0.agent.readiness import (
    GIVE_UP_S, RETRY_S, Decision, Hardware, arm_problem, decide, probe_arm, probe_camera, rig_hardware, run_probe,
    wait_until_ready,
)
from zk0.hw.config import ArmConfig, CameraConfig
from zk0.hw.sim.calibration import calibrated_arm_bus
from zk0.hw.sim.cameras import frame_message
from zk0.hw.sim.feetech import FeetechBus
from zk0.hw.sim.feetech_protocol import MODEL_NUMBER
from zk0.hw.sim.pty_bus import PtyBusServer

STS3215 = MODEL_NUMBER
MOTORS = {"shoulder_pan": (1, STS3215), "gripper": (6, STS3215)}


@pytest.mark.parametrize(("found", "expected"), [
    ({"shoulder_pan": STS3215, "gripper": STS3215}, None),
    ({"shoulder_pan": STS3215, "gripper": None}, "follower arm on /dev/ttyUSB0: no answer from gripper (id 6)"),
    ({"shoulder_pan": STS3215}, "follower arm on /dev/ttyUSB0: no answer from gripper (id 6)"),
    ({"shoulder_pan": 1, "gripper": STS3215},
     f"follower arm on /dev/ttyUSB0: shoulder_pan (id 1) is model 1, expected {STS3215}"),
    ({"shoulder_pan": None, "gripper": None},
     "follower arm on /dev/ttyUSB0: no motor answers (powered? the right port?)"),
])
def test_what_the_pings_say_about_an_arm(found, expected) -> None:
    assert arm_problem("follower", "/dev/ttyUSB0", MOTORS, found) == expected


@pytest.mark.parametrize(("problems", "elapsed", "action", "words"), [
    ([], 0.0, "ready", "robot and cameras answer"),
    ([], 500.0, "ready", "robot and cameras answer"),  # late but there: ready all the same
    (["camera front: no frame"], 0.0, "retry", "camera front: no frame; retrying in 5 s"),
    (["a", "b"], GIVE_UP_S - RETRY_S, "retry", "a; b; retrying"),
    (["a"], GIVE_UP_S - RETRY_S + 0.1, "give-up", f"a (still failing after {GIVE_UP_S - RETRY_S:.0f} s)"),
])
def test_ready_retry_or_give_up(problems, elapsed, action, words) -> None:
    decision = decide(problems, elapsed)
    assert decision.action == action and words in decision.reason
    assert decision.retry_in_s == (RETRY_S if action == "retry" else 0.0)


def test_the_check_is_retried_until_the_hardware_answers_and_a_stop_ends_the_wait() -> None:
    results = iter([["leader arm on /dev/ttyACM1: no motor answers"], ["camera wrist: no frame"], []])
    reports: list[Decision] = []
    assert wait_until_ready(lambda: next(results), reports.append, threading.Event(), retry_s=0.01).action == "ready"
    assert [d.action for d in reports] == ["retry", "retry", "ready"] and "leader arm" in reports[0].reason

    clock = iter([0.0, 0.0, 200.0])  # the second try ends past the budget: give up, with the reason
    final = wait_until_ready(lambda: ["no motor answers"], lambda _: None, threading.Event(), clock=lambda: next(clock),
                             retry_s=0.01)
    assert final.action == "give-up" and "no motor answers" in final.reason

    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()  # SIGTERM while the agent waits to retry
    assert wait_until_ready(lambda: ["camera front: no frame"], lambda _: None, stop, retry_s=60.0) is None


def test_a_stopped_check_kills_its_child_at_once() -> None:
    stop = threading.Event()
    stop.set()
    hardware = Hardware(ArmConfig("/dev/null", "f", Path(".")), ArmConfig("/dev/null", "l", Path(".")), ())
    assert run_probe(hardware, stop, os.environ) == ["stopping"]  # killed, not waited for


def test_the_child_reads_the_hardware_the_rig_describes() -> None:
    info = {"robot": "so101", "follower_port": "/dev/pts/7", "leader_port": "/dev/pts/8", "follower_id": "f",
            "leader_id": "l", "calibration_dir": "/tmp/cal", "camera_host": "127.0.0.1", "camera_port": 4242,
            "cameras": [{"name": "front", "width": 320, "height": 240}], "fps": 30}
    hardware = rig_hardware(info)
    assert hardware.follower == ArmConfig("/dev/pts/7", "f", Path("/tmp/cal"))
    assert hardware.cameras == (CameraConfig("front", "zmq", 320, 240, 30, host="127.0.0.1", port=4242),)
    assert Hardware.from_json(hardware.to_json()) == hardware


# -- the probes on simulated hardware ----------------------------------------------------------------------------
def lerobot_bus(port: str, tmp_path: Path):
    from zk0.hw.robots import make_follower

    return make_follower(ArmConfig(port, "sim_follower", tmp_path / "calibration"), (), read_retries=0).bus


def test_every_motor_of_a_whole_arm_answers_and_a_missing_or_foreign_one_is_named(tmp_path: Path) -> None:
    with PtyBusServer(calibrated_arm_bus("follower")) as whole:
        assert probe_arm("follower", lerobot_bus(whole.port, tmp_path)) is None
    odd = FeetechBus([1, 2, 3, 4, 5, 6])
    odd.servos[6].set("Model_Number", 1234)  # another servo model on the gripper's id
    with PtyBusServer(odd) as server:
        problem = probe_arm("follower", lerobot_bus(server.port, tmp_path))
    assert problem == f"follower arm on {server.port}: gripper (id 6) is model 1234, expected {STS3215}", problem
    with PtyBusServer(FeetechBus([1, 2, 3, 4, 5])) as server:  # the gripper's servo unplugged
        assert probe_arm("leader", lerobot_bus(server.port, tmp_path)) == \
            f"leader arm on {server.port}: no answer from gripper (id 6)"
    problem = probe_arm("follower", lerobot_bus(str(tmp_path / "ttyUSB9"), tmp_path))
    assert problem.startswith(f"follower arm: cannot open {tmp_path / 'ttyUSB9'}"), problem


@pytest.fixture
def camera_stream() -> Iterator[int]:
    """lerobot's image-server protocol on a real ZMQ socket (as the sim rig's cameras), one small frame every 30 ms;
    yields its port."""
    socket = zmq.Context.instance().socket(zmq.PUB)
    socket.setsockopt(zmq.LINGER, 0)
    port = socket.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()
    message = frame_message({"front": np.full((48, 64, 3), 90, np.uint8)}, 0.0)

    def publish() -> None:
        while not stop.wait(0.03):
            socket.send_string(message)

    thread = threading.Thread(target=publish, daemon=True)
    thread.start()
    yield port
    stop.set()
    thread.join()
    socket.close()


def test_a_camera_that_delivers_a_frame_passes_and_a_silent_one_is_named(camera_stream: int) -> None:
    streaming = CameraConfig("front", "zmq", 64, 48, 30, host="127.0.0.1", port=camera_stream)
    assert probe_camera(streaming, timeout_ms=3000) is None
    silent = CameraConfig("wrist", "zmq", 64, 48, 30, host="127.0.0.1", port=1)
    problem = probe_camera(silent, timeout_ms=300)
    assert problem is not None and problem.startswith("camera wrist: no frame"), problem
