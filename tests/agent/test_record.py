"""The record loop: timing math, the safety clamp, and `zk0 record` driving simulated arms on real ptys."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from lerobot.datasets import LeRobotDataset
from lerobot.motors import MotorCalibration, MotorNormMode

from zk0.agent.dataset_store import read_commit
from zk0.agent.record import OperatorEvents, is_slow, tick_timing
from zk0.hw.safety import clamp_target, limits_from_calibration

PERIOD = 1 / 30


def test_tick_timing_on_schedule() -> None:
    deadlines = np.arange(90) * PERIOD
    timing = tick_timing(deadlines + 0.001, deadlines, deadlines + 0.01, PERIOD)
    assert timing.ticks == 90 and timing.overruns == 0 and timing.on_time_fraction == 1.0
    assert timing.jitter_p50_ms == pytest.approx(1.0) and timing.achieved_fps == pytest.approx(30.0)


def test_tick_timing_counts_overruns_and_true_rate() -> None:
    # 10 ticks; tick 4 takes three periods, so the schedule moves and the true rate drops
    starts = np.array([0, 1, 2, 3, 4, 7, 8, 9, 10, 11]) * PERIOD
    ends = starts + 0.005
    ends[4] = starts[4] + 3 * PERIOD
    timing = tick_timing(starts, starts.copy(), ends, PERIOD)
    assert timing.overruns == 1 and timing.on_time_fraction == pytest.approx(0.9)
    assert timing.achieved_fps == pytest.approx(9 / (11 * PERIOD))
    assert is_slow(timing.achieved_fps, 30, 0.95) and not is_slow(29.0, 30, 0.95)


def test_clamp_relative_then_calibrated_range() -> None:
    calibration = {
        "elbow_flex": MotorCalibration(id=3, drive_mode=0, homing_offset=0, range_min=2047 - 1024, range_max=2047 + 1024),
        "gripper": MotorCalibration(id=6, drive_mode=0, homing_offset=0, range_min=2000, range_max=3400),
    }
    limits = limits_from_calibration(calibration, {"elbow_flex": MotorNormMode.DEGREES, "gripper": MotorNormMode.RANGE_0_100})
    assert limits.upper[0] == pytest.approx(1024 * 360 / 4095)  # 90.02 degrees
    present = np.array([85.0, 50.0])
    assert clamp_target(np.array([120.0, 52.0]), present, limits, 20.0).tolist() == pytest.approx([limits.upper[0], 52.0])
    assert clamp_target(np.array([0.0, -30.0]), present, limits, 20.0).tolist() == [65.0, 30.0]
    assert clamp_target(np.array([-200.0, 150.0]), present, limits, None).tolist() == pytest.approx([limits.lower[0], 100.0])


def test_operator_commands_from_stream() -> None:
    events = OperatorEvents()
    read, write = os.pipe()
    events.watch_stream(os.fdopen(read))
    with os.fdopen(write, "w") as stream:
        stream.write("r\n")
    time.sleep(0.2)
    assert events.take_ending() == "rerecord" and events.take_ending() is None
    events.request("stop")
    assert events.stop and events.take_ending() == "save"


def _record(config: Path, *extra: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "zk0.cli", "record", "--config", str(config), "--dataset", "demo",
         "--task", "pick the red cube", "--no-progress", *extra],
        input=stdin, capture_output=True, text=True, timeout=180, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


@pytest.mark.slow
def test_record_on_simulated_arms_and_resume(sim_arms_config: Path) -> None:
    datasets = sim_arms_config.parent / "datasets"
    first = _record(sim_arms_config, "--episodes", "2")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "saved 2/2" in first.stdout
    second = _record(sim_arms_config, "--episodes", "1", "--episode-time-s", "0.5")
    assert second.returncode == 0, second.stderr[-2000:]

    dataset = LeRobotDataset("local/demo", root=datasets / "demo")
    assert dataset.num_episodes == 3 and dataset.fps == 30
    assert dataset.meta.features["observation.state"]["shape"] == (6,)
    assert dataset.meta.features["action"]["shape"] == (6,)
    assert len(dataset) == 30 + 30 + 15
    frame = dataset[5]
    assert frame["task"] == "pick the red cube"
    # capture time is the real time since the first frame, within a tick of the nominal stamp
    assert abs(frame["capture_time_s"].item() - frame["timestamp"].item()) < PERIOD
    record = read_commit(datasets / "demo")
    assert [e.length for e in record.episodes] == [30, 30, 15]
    assert record.identity.host_id == "test-host" and len(record.identity.calibration_hash) == 64
    assert all(e.achieved_fps > 0 for e in record.episodes)


@pytest.mark.slow
def test_discard_then_save_from_stdin(sim_arms_config: Path) -> None:
    # "d" ends the first episode discarded; the session records until one episode is saved
    result = _record(sim_arms_config, "--episodes", "1", "--reset-time-s", "0", stdin="d\n")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "saved 1/1, discarded 1" in result.stdout
    assert read_commit(sim_arms_config.parent / "datasets" / "demo").episodes[0].episode_index == 0
