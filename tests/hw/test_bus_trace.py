"""The simulator's bus trace: every Goal_Position and Torque_Enable write the servos receive, by any path."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from lerobot.robots.so_follower import SOFollower, SOFollowerRobotConfig

from zk0.hw.sim.bus_trace import BusTrace, traced_values
from zk0.hw.sim.calibration import MOTOR_NAMES, arm_calibration, calibrated_arm_bus, joints_to_ticks
from zk0.hw.sim.feetech_protocol import (
    BROADCAST_ID,
    CONTROL_TABLE,
    INST_ACTION,
    INST_REG_WRITE,
    INST_SYNC_WRITE,
    INST_WRITE,
    Instruction,
    encode_sign_magnitude,
)
from tests.hw.conftest import connect_retrying

TORQUE = CONTROL_TABLE["Torque_Enable"][0]  # 40
GOAL = CONTROL_TABLE["Goal_Position"][0]  # 42, two bytes, sign bit 15


def read_trace(path: Path, count: int, timeout_s: float = 2.0) -> list[dict]:
    """The trace's lines once it holds at least `count` (it is flushed every 100 ms)."""
    deadline = time.monotonic() + timeout_s
    while True:
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("address", "data", "expected"),
    [
        (TORQUE, b"\x01", [("Torque_Enable", 1)]),
        (GOAL, (2047).to_bytes(2, "little"), [("Goal_Position", 2047)]),
        (GOAL, encode_sign_magnitude(-5, 15).to_bytes(2, "little"), [("Goal_Position", -5)]),
        # one write covering Torque_Enable, Acceleration and Goal_Position
        (TORQUE, b"\x00\x10" + (100).to_bytes(2, "little"), [("Goal_Position", 100), ("Torque_Enable", 0)]),
        (GOAL, b"\x10", []),  # half a goal is no goal
        (CONTROL_TABLE["Lock"][0], b"\x00", []),
    ],
)
def test_traced_values(address, data, expected) -> None:
    assert traced_values(address, data) == expected


def test_every_write_path_is_traced_in_order(tmp_path: Path) -> None:
    bus = calibrated_arm_bus("follower")
    trace = BusTrace(tmp_path / "trace.jsonl")
    bus.write_observer = trace.observer("follower")
    goal = (1500).to_bytes(2, "little")
    bus.handle(Instruction(2, INST_WRITE, bytes([TORQUE, 1])))
    bus.handle(Instruction(2, INST_REG_WRITE, bytes([GOAL]) + goal))
    bus.handle(Instruction(4, INST_WRITE, bytes([CONTROL_TABLE["Lock"][0], 0])))  # not a traced register
    bus.handle(Instruction(BROADCAST_ID, INST_ACTION, b""))
    bus.handle(Instruction(BROADCAST_ID, INST_SYNC_WRITE, bytes([GOAL, 2, 1]) + goal + bytes([5]) + (900).to_bytes(2, "little")))
    lines = read_trace(trace.path, 4)  # flushed by the writer thread, before close
    trace.close()
    assert [(line["id"], line["register"], line["value"], line["via"]) for line in lines] == [
        (2, "Torque_Enable", 1, "write"),
        (2, "Goal_Position", 1500, "action"),
        (1, "Goal_Position", 1500, "sync_write"),
        (5, "Goal_Position", 900, "sync_write"),
    ]
    assert {line["arm"] for line in lines} == {"follower"}
    assert all(abs(line["t"] - time.time()) < 60 for line in lines)
    assert bus.servos[2].get("Goal_Position") == 1500  # the trace observes, it does not intercept


def test_trace_of_a_lerobot_follower_on_a_traced_sim_arm(sim_arm, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("builtins.input", lambda *_: pytest.fail("lerobot asked for interactive calibration"))
    path = tmp_path / "bus.jsonl"
    port = sim_arm("follower", "so101", None, "--bus-trace", str(path))
    robot = SOFollower(SOFollowerRobotConfig(port=port, id="sim_follower", calibration_dir=tmp_path / "calibration",
                                             use_degrees=True))
    connect_retrying(robot)
    targets = [[10.0, -5.0, 20.0, 0.0, 45.0, 30.0], [12.0, -6.0, 21.0, 1.0, 44.0, 60.0], [0.0] * 5 + [90.0]]
    try:
        connected = len(read_trace(path, 12))  # configure: torque off, then on again, on every motor
        for joints in targets:
            robot.send_action({f"{name}.pos": value for name, value in zip(MOTOR_NAMES, joints, strict=True)})
        robot.bus.disable_torque(["elbow_flex"])
    finally:
        robot.bus.disconnect(disable_torque=False)
    lines = read_trace(path, connected + 19)[connected:]
    goals = [line for line in lines if line["register"] == "Goal_Position"]
    assert [line["via"] for line in goals] == ["sync_write"] * 18
    for sent, written in zip(targets, (goals[i : i + 6] for i in range(0, 18, 6)), strict=True):
        expected = joints_to_ticks(sent, arm_calibration("follower"))
        assert [line["id"] for line in written] == list(range(1, 7))
        assert all(abs(line["value"] - expected[line["id"]]) <= 1 for line in written), (written, expected)
    assert [(line["id"], line["register"], line["value"], line["via"]) for line in lines[18:]] == [
        (3, "Torque_Enable", 0, "write")
    ]
    assert {line["arm"] for line in lines} == {"follower"}
