"""The record loop: timing math, and `zk0 record` driving simulated arms on real ptys through the safety envelope
(the envelope itself: tests/hw/test_safety.py)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from lerobot.datasets import LeRobotDataset

from zk0.agent.dataset_commit import read_commit
from zk0.agent.record import CAPTURE_TIME, OperatorEvents, Recorder, RecordPlan, is_slow, tick_timing
from tests.agent.conftest import FEATURES, FPS, JOINTS

PERIOD = 1 / 30


def test_tick_timing_on_schedule() -> None:
    deadlines = np.arange(90) * PERIOD
    timing = tick_timing(deadlines + 0.001, deadlines, deadlines + 0.01, PERIOD)
    assert timing.ticks == 90 and timing.overruns == 0 and timing.on_time_fraction == 1.0
    assert timing.jitter_p50_ms == pytest.approx(1.0) and timing.achieved_fps == pytest.approx(30.0)


def test_tick_timing_counts_overruns_and_true_rate() -> None:
    # 10 ticks; tick 4 takes three periods, so the schedule moves, the slots 5 and 6 pass without a tick (late,
    # like the overrun) and the true rate drops
    starts = np.array([0, 1, 2, 3, 4, 7, 8, 9, 10, 11]) * PERIOD
    ends = starts + 0.005
    ends[4] = starts[4] + 3 * PERIOD
    timing = tick_timing(starts, starts.copy(), ends, PERIOD)
    assert timing.overruns == 1 and timing.skipped == 2 and timing.on_time_fraction == pytest.approx(9 / 12)
    assert timing.achieved_fps == pytest.approx(9 / (11 * PERIOD))
    assert is_slow(timing.achieved_fps, 30, 0.95) and not is_slow(29.0, 30, 0.95)


def test_tick_timing_counts_failed_ticks_as_late() -> None:
    deadlines = np.arange(8) * PERIOD
    timing = tick_timing(deadlines, deadlines, deadlines + 0.005, PERIOD, failed=2)
    assert (timing.ticks, timing.failed, timing.overruns) == (8, 2, 0)
    assert timing.on_time_fraction == pytest.approx(0.8)
    assert tick_timing(np.empty(0), np.empty(0), np.empty(0), PERIOD, failed=3).on_time_fraction == 0.0


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


class FollowingArm:
    """A follower that reaches every target it is sent by the next tick (no bus, no cameras)."""

    def __init__(self) -> None:
        self.joints = dict.fromkeys(JOINTS, 0.0) | {"gripper.pos": 50.0}
        self.sent: list[dict] = []

    def get_observation(self) -> dict:
        return dict(self.joints)

    def send_action(self, action: dict) -> dict:
        self.sent.append(action)
        self.joints = dict(action)
        return action


class ScriptedLeader:
    """The leader's targets, one per tick: a 30-degree jump on the elbow, then garbage."""

    def __init__(self, elbow: list[float]) -> None:
        self._elbow = iter(elbow)

    def get_action(self) -> dict:
        return dict.fromkeys(JOINTS, 0.0) | {"elbow_flex.pos": next(self._elbow, 30.0), "gripper.pos": 50.0}


class ListStore:
    """An episode store keeping frames in memory."""

    def __init__(self, root: Path) -> None:
        self.root, self.num_episodes, self.frames = root, 0, []
        self.features = {key: FEATURES[key] for key in ("action", "observation.state", CAPTURE_TIME)}

    def add_frame(self, frame: dict) -> None:
        self.frames.append(frame)

    def commit_episode(self, meta) -> None:
        self.num_episodes += 1
        self.committed = meta

    def discard_episode(self) -> None:
        self.frames.clear()


def _envelope():
    from zk0.hw.config import SafetySettings
    from zk0.hw.safety import JointLimits, SafetyEnvelope, envelope_spec

    names = tuple(key.removesuffix(".pos") for key in JOINTS)
    limits = JointLimits(names, np.array([-100.0] * 5 + [0.0]), np.array([100.0] * 5 + [100.0]))
    return SafetyEnvelope(envelope_spec(limits, SafetySettings(), FPS))


ONE_SHORT_EPISODE = RecordPlan(task="t", episodes=1, fps=FPS, episode_time_s=0.2, reset_time_s=0, min_rate_fraction=0.5,
                               min_free_disk_mb=0, calibration_hash="cafe")


def test_recorder_sends_and_records_what_the_envelope_allows(tmp_path: Path) -> None:
    arm, store = FollowingArm(), ListStore(tmp_path)
    leader = ScriptedLeader([30.0, 30.0, math.nan, 30.0, math.inf, 30.0])
    summary = Recorder(arm, leader, store, _envelope(), ONE_SHORT_EPISODE, OperatorEvents()).record()

    elbow = [frame["action"][JOINTS.index("elbow_flex.pos")] for frame in store.frames]
    # 10 (step bound, no previous target), 6 per tick at 180 deg/s, holds on NaN and inf
    assert elbow == pytest.approx([10, 16, 16, 22, 22, 28][: len(elbow)]) and len(elbow) >= 5
    assert [sent["elbow_flex.pos"] for sent in arm.sent] == pytest.approx(elbow)
    assert summary.interventions[0]["non-finite"] == 2 and summary.interventions[0]["step"] == 1
    assert store.committed.interventions == len(elbow)  # every frame's action was changed or held


def test_progress_is_reported_from_the_first_recorded_frame(tmp_path: Path) -> None:
    """zk0ctl status (and the agent's preemption bench) sees teleop running at its first frame, not a second on."""
    reported: list[tuple[int, int]] = []
    Recorder(FollowingArm(), ScriptedLeader([]), ListStore(tmp_path), _envelope(), ONE_SHORT_EPISODE, OperatorEvents(),
             progress=lambda episode, frames: reported.append((episode, frames))).record()
    assert reported == [(0, 1)]


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
    record = read_commit(datasets / "demo")
    lengths = [e.length for e in record.episodes]
    # an episode lasts its time on the wall clock: a loaded host records fewer frames, never more
    assert 0 < lengths[0] <= 30 and 0 < lengths[1] <= 30 and 0 < lengths[2] <= 15
    assert len(dataset) == sum(lengths)
    assert dataset[5]["task"] == "pick the red cube"
    # capture time is the real time since the episode's first frame: increasing, never ahead of the nominal
    # stamp (ticks wait for their deadline), within the episode time (late ticks drop frames, never extend it)
    first = dataset.hf_dataset.filter(lambda row: row["episode_index"] == 0).with_format("numpy")
    captured, nominal = np.asarray(first["capture_time_s"]).reshape(-1), np.asarray(first["timestamp"])
    assert np.all(np.diff(captured) > 0) and np.all(captured >= nominal - 1e-3) and captured[-1] < 1.0
    assert record.identity.host_id == "test-host" and len(record.identity.calibration_hash) == 64
    assert all(e.achieved_fps > 0 for e in record.episodes)


@pytest.mark.slow
def test_a_calibration_file_the_motors_disagree_with_is_refused(sim_arms_config: Path) -> None:
    import json

    path = sim_arms_config.parent / "calibration" / "sim_leader.json"
    calibration = json.loads(path.read_text())
    calibration["wrist_flex"]["homing_offset"] += 100
    path.write_text(json.dumps(calibration))
    refused = _record(sim_arms_config, "--episodes", "1")
    assert refused.returncode == 2
    [line] = refused.stderr.strip().splitlines()[-1:]
    assert "sim_leader" in line and "wrist_flex.homing_offset" in line and "--write-calibration" in line
    assert read_commit(sim_arms_config.parent / "datasets" / "demo").episodes == []
    written = _record(sim_arms_config, "--episodes", "1", "--write-calibration")
    assert written.returncode == 0, written.stderr[-2000:]
    assert "saved 1/1" in written.stdout


@pytest.mark.slow
def test_discard_then_save_from_stdin(sim_arms_config: Path) -> None:
    # "d" ends the first episode discarded; the session records until one episode is saved
    result = _record(sim_arms_config, "--episodes", "1", "--reset-time-s", "0", stdin="d\n")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "saved 1/1, discarded 1" in result.stdout
    assert read_commit(sim_arms_config.parent / "datasets" / "demo").episodes[0].episode_index == 0


@pytest.mark.slow
def test_done_when_sim_session(tmp_path: Path) -> None:
    """The issue's done-when: `zk0 record --sim --dataset demo --root DIR --task "pick the red cube" --episodes 3`
    with the default configs/agent.yaml (two 640x480 cameras, 20 s episodes)."""
    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-m", "zk0.cli", "record", "--sim", "--dataset", "demo", "--root", str(tmp_path),
         "--task", "pick the red cube", "--episodes", "3", "--no-progress"],
        cwd=repo, capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]

    dataset = LeRobotDataset("local/demo", root=tmp_path / "demo")
    assert dataset.num_episodes == 3 and dataset.fps == 30
    assert dataset.meta.features["observation.state"]["shape"] == (6,)
    assert dataset.meta.features["action"]["shape"] == (6,)
    assert dataset.meta.video_keys == ["observation.images.front", "observation.images.wrist"]
    assert list(dataset.meta.tasks.index) == ["pick the red cube"]
    record = read_commit(tmp_path / "demo")
    assert [e.seed for e in record.episodes] == [0, 1, 2] and all(e.success is not None for e in record.episodes)

    # The state is the simulated follower's: it moves (the scripted operator performs the task) and
    # follows the actions sent to it, a few ticks behind.
    episode = dataset.hf_dataset.filter(lambda row: row["episode_index"] == 0).with_format("numpy")
    state, action = np.stack(episode["observation.state"]), np.stack(episode["action"])
    assert np.ptp(state[:, :5], axis=0).max() > 10.0  # degrees
    lag = 3
    tracking_error = np.abs(state[lag:, :5] - action[:-lag, :5]).mean()
    assert tracking_error < 0.05 * np.ptp(state[:, :5], axis=0).max()
    frame = dataset[len(episode) // 2]
    assert frame["observation.images.front"].shape == (3, 480, 640)
    assert frame["observation.images.front"].std() > 0.01  # a rendered scene, not a blank frame


@pytest.fixture
def rig_config(tmp_path: Path):
    """A running simulated rig (no cameras) and an agent config pointing at its arms, bus reads not retried."""
    from zk0.hw.sim.rig_handle import RigHandle

    with RigHandle.start(cameras=(), calibration_dir=tmp_path / "calibration") as rig:
        config = tmp_path / "agent.yaml"
        config.write_text(
            f"host_id: test-host\nrobot_type: {rig.info['robot']}\ncameras: []\n"
            f"follower: {{port: {rig.follower_port}, id: {rig.info['follower_id']}, calibration_dir: {rig.calibration_dir}}}\n"
            f"leader: {{port: {rig.leader_port}, id: {rig.info['leader_id']}, calibration_dir: {rig.calibration_dir}}}\n"
            f"datasets_root: {tmp_path / 'datasets'}\n"
            "record: {fps: 30, episode_time_s: 3.0, reset_time_s: 0, min_free_disk_mb: 1, read_retries: 0}\n"
        )
        yield rig, config


def _record_until(config: Path, progress_text: str, episodes: int) -> subprocess.Popen:
    """Start `zk0 record` with progress bars and return once they show `progress_text` (e.g. "episode 1")."""
    process = subprocess.Popen(
        [sys.executable, "-m", "zk0.cli", "record", "--config", str(config), "--dataset", "demo",
         "--task", "pick the red cube", "--episodes", str(episodes)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    seen, deadline = b"", time.monotonic() + 120
    while progress_text.encode() not in seen:
        chunk = os.read(process.stderr.fileno(), 4096)
        assert chunk and time.monotonic() < deadline, f"zk0 record never showed {progress_text!r}: {seen[-2000:]!r}"
        seen += chunk
    return process


@pytest.mark.slow
def test_lost_status_packets_drop_ticks_not_the_session(rig_config) -> None:
    rig, config = rig_config
    process = _record_until(config, "episode 0", episodes=1)
    rig.inject_faults("follower", drop_rate=0.1)  # ~half the state reads lose a status packet
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-2000:]
    episode = read_commit(config.parent / "datasets" / "demo").episodes[0]
    assert episode.failed_ticks > 0 and episode.length > 0
    assert f"{episode.failed_ticks} failed ticks" in out.decode()
    assert LeRobotDataset("local/demo", root=config.parent / "datasets" / "demo").num_episodes == 1


@pytest.mark.slow
def test_dead_arm_discards_the_episode_and_keeps_committed_ones(rig_config) -> None:
    rig, config = rig_config
    process = _record_until(config, "episode 1", episodes=3)
    rig.inject_faults("follower", drop_rate=1.0)  # the follower stops answering for good
    _, err = process.communicate(timeout=120)
    assert process.returncode == 1
    assert "hardware stopped answering" in err.decode() and "1 committed episodes are intact" in err.decode()
    dataset = LeRobotDataset("local/demo", root=config.parent / "datasets" / "demo")
    assert dataset.num_episodes == 1 and len(read_commit(config.parent / "datasets" / "demo").episodes) == 1


@pytest.mark.parametrize(("first_seed", "recorded", "episodes", "refused"), [
    (0, 0, 50, False),
    (999_950, 0, 50, False),  # the last seed is 999 999
    (999_950, 1, 50, True),  # one recorded episode earlier pushes the last onto the first validation seed
    (1_000_000, 0, 1, True),
    (-1, 0, 1, True),
])
def test_recording_seeds_stay_below_the_validation_seeds(first_seed, recorded, episodes, refused) -> None:
    from zk0.agent.config import ConfigError
    from zk0.agent.record_cli import check_recording_seeds

    if refused:
        with pytest.raises(ConfigError, match="validation uses the seeds"):
            check_recording_seeds(first_seed, recorded, episodes)
    else:
        check_recording_seeds(first_seed, recorded, episodes)
