"""`zk0 rollout` end to end on the simulated rig: lerobot's SO follower on the pty bus at 30 Hz, a tiny policy
from the policy store, the bus trace (what the simulated servos actually received) as the witness.

- `--policy active` from a store, recorded with --record: episodes, verdicts, intervention flags, policy version.
- A checkpoint whose action head is NaN (sync engine) or scaled by 1e3 (RTC engine): every goal on the bus is
  inside the calibrated limits and every step inside the envelope's bound; the interventions are reported.
- `zk0ctl estop` and SIGTERM (then SIGINT): the arm holds at once and goes limp estop_hold_s later; exit 3, the
  report says why.
- `zk0 validate` on the robot (the rig through a config naming its ports, no --sim): the operator's verdicts from
  `zk0ctl verdict` end or conclude each episode and land in the report under the right policy.
- DAgger with --dagger: `zk0ctl pause` holds the arm and drives the leader to it, `zk0ctl correct` hands the arm to
  the leader (the scripted operator finishes the task), the recorded frames carry the intervention flag.
- The watchdog against a stalling inference engine (in-process, real rig and bus): hold within 200 ms of the
  last action, torque off after 1 s, measured on the bus.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.e2e.conftest import REPO, run_zk0

pytestmark = pytest.mark.slow

CONFIG = REPO / "configs" / "agent.yaml"
TASK = "pick_place_red"
FPS = 30
MAX_STEP = 10.0  # SafetySettings defaults: degrees (joints 1-5) and percent (gripper) per tick
TICK_TOLERANCE = 0.1  # one raw tick is 0.088 degrees / 0.071 percent


@pytest.fixture(scope="module")
def policies(tmp_path_factory) -> dict[str, Path]:
    """A tiny policy for a dataset recorded with `zk0 record --sim`: as a checkpoint, in a policy store (active),
    and with its action head corrupted (NaN weights; weights x 1e3)."""
    import torch
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata

    from zk0.agent.policy_store import PolicyStore
    from zk0.learn.checkpoint import CheckpointMeta, save_checkpoint
    from zk0.learn.codec import tensors_sha256
    from zk0.learn.policy import PolicySpec, seeded_policy_bundle, trainable_state

    root = tmp_path_factory.mktemp("rollout")
    for _ in range(3):  # on a saturated machine a connect can miss lerobot's 50 ms reply timeout three times in a row
        result = run_zk0("record", "--sim", "--config", str(CONFIG), "--root", str(root / "datasets"), "--dataset",
                         "red", "--task", TASK, "--episodes", "1", "--episode-time-s", "1", "--reset-time-s", "0",
                         "--no-progress", "--control", f"ipc://{root}/record.sock", timeout=600)
        if result.returncode == 0:
            break
    assert result.returncode == 0, result.stdout + result.stderr
    meta = LeRobotDatasetMetadata("local/red", root=root / "datasets" / "red")
    bundle = seeded_policy_bundle(PolicySpec(model="tiny"), meta, seed=0)
    paths = {"checkpoint": root / "tiny", "store": root / "store"}
    save_checkpoint(paths["checkpoint"], bundle, CheckpointMeta(run="rollout-test", round=1))
    PolicyStore(paths["store"]).add_from_bundle(bundle, run="rollout-test", round=1, stats=None, server_metrics={},
                                                global_sha256=tensors_sha256(trainable_state(bundle.policy)))
    head = bundle.policy.model.action_out_proj
    with torch.no_grad():
        head.weight.mul_(1e3)
        head.bias.mul_(1e3)
    save_checkpoint(root / "x1e3", bundle, CheckpointMeta(run="rollout-test", round=2))
    with torch.no_grad():
        head.weight.fill_(float("nan"))
    save_checkpoint(root / "nan", bundle, CheckpointMeta(run="rollout-test", round=3))
    return {**paths, "x1e3": root / "x1e3", "nan": root / "nan", "root": root}


def rollout_args(tmp_path: Path, policy: str, *extra: str) -> list[str]:
    return ["rollout", "--sim", "--config", str(CONFIG), "--policy", policy, "--task", TASK, "--control",
            f"ipc://{tmp_path}/ctl.sock", "--bus-trace", str(tmp_path / "trace.jsonl"), *extra]


def follower_goals(trace: Path) -> tuple[np.ndarray, np.ndarray]:
    """(times, goals in normalized joint units) of every sync write of the follower's six goal positions."""
    from zk0.hw.sim.calibration import arm_calibration, ticks_to_joints

    calibration = arm_calibration("follower")
    for name, cal in calibration.items():  # the raw goal must be inside the calibrated range, before any conversion
        raw = [r["value"] for r in read_trace(trace) if r["register"] == "Goal_Position" and r["id"] == cal.id]
        assert raw and cal.range_min <= min(raw) and max(raw) <= cal.range_max, name
    times, goals, current = [], [], {}
    for record in read_trace(trace):
        if record["register"] == "Goal_Position":
            current[record["id"]] = record["value"]
            if len(current) == 6:
                times.append(record["t"])
                goals.append(ticks_to_joints(current, calibration))
                current = {}
    return np.array(times), np.array(goals)


def read_trace(trace: Path) -> list[dict]:
    return [r for r in map(json.loads, trace.read_text().splitlines()) if r["arm"] == "follower"]


def torque_off_times(trace: Path) -> list[float]:
    return [r["t"] for r in read_trace(trace) if r["register"] == "Torque_Enable" and r["value"] == 0]


def assert_inside_envelope(goals: np.ndarray) -> None:
    """Each goal of one episode within the step bound of the one before (the first: of the rig's home pose,
    all zeros). The envelope bounds a goal's step from the present position, which the trace lacks; between
    consecutive goals it allows the velocity bound (6 degrees per tick by default) unless the arm lags far behind."""
    steps = np.abs(np.diff(goals, axis=0, prepend=np.zeros((1, 6))))
    assert steps.max() <= MAX_STEP + TICK_TOLERANCE, steps.max(axis=0)


def test_active_policy_from_the_store_runs_and_records_at_30_hz(policies, tmp_path: Path) -> None:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from zk0.agent.dataset_commit import read_commit

    datasets = tmp_path / "datasets"
    result = run_zk0(*rollout_args(tmp_path, "active", "--store", str(policies["store"]), "--episodes", "2",
                                   "--episode-time-s", "2", "--record", "rollouts", "--root", str(datasets)), timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    episodes = [line for line in result.stdout.splitlines() if line.strip().startswith("episode ")]
    assert len(episodes) == 2 and all("success=" in line and "on time" in line for line in episodes), result.stdout
    # Goals inside the limits (follower_goals); the step check is the single-episode tests' (here the rig's reset
    # moves the arm home between episodes, outside the bus).
    times, goals = follower_goals(tmp_path / "trace.jsonl")
    assert abs(np.median(np.diff(times)) - 1 / FPS) < 0.005  # one goal per tick at 30 Hz
    commit = read_commit(datasets / "rollouts")
    assert [e.policy for e in commit.episodes] == ["rollout-test-round1@" + e.policy.split("@")[1] for e in commit.episodes]
    assert all(e.success is not None and e.interventions is not None for e in commit.episodes)
    dataset = LeRobotDataset("local/rollouts", root=datasets / "rollouts")
    assert dataset.num_episodes == 2 and dataset.features["intervention"]["dtype"] == "bool"
    assert sum(e.length for e in commit.episodes) == dataset.num_frames


@pytest.mark.parametrize(("corruption", "inference", "expected"), [
    ("nan", "sync", "non-finite"),
    ("x1e3", "rtc", "joint-limit"),
])
def test_corrupted_action_head_never_leaves_the_envelope(policies, tmp_path: Path, corruption, inference, expected) -> None:
    result = run_zk0(*rollout_args(tmp_path, str(policies[corruption]), "--inference", inference,
                                   "--episode-time-s", "3"), timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    times, goals = follower_goals(tmp_path / "trace.jsonl")
    assert len(goals) >= 2 * FPS  # the policy kept sending (held or clipped), it did not go quiet
    assert_inside_envelope(goals)
    report = next(line for line in result.stdout.splitlines() if line.strip().startswith("episode 0"))
    assert expected in report and "interventions 0 ticks" not in report, report


@pytest.mark.parametrize("trigger", ["zk0ctl", "SIGTERM"])
def test_estop_holds_then_cuts_torque(policies, tmp_path: Path, trigger: str) -> None:
    """`zk0ctl estop`, or systemd's stop: SIGTERM to the rollout's whole process group (as a terminal's Ctrl-C
    sends SIGINT), then a Ctrl-C during the hold, which changes nothing (the first request counts; SIGINT alone
    is tests/agent/test_rollout.py's)."""
    from zk0.agent.ctl import main as zk0ctl

    address, report = f"ipc://{tmp_path}/ctl.sock", tmp_path / "report.json"
    process = subprocess.Popen([sys.executable, "-m", "zk0.cli", *rollout_args(tmp_path, str(policies["checkpoint"]),
                                "--episode-time-s", "60", "--report", str(report))], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                               start_new_session=True)
    try:
        wait_until_driving(process, address)
        requested = time.time()
        if trigger == "zk0ctl":
            assert zk0ctl(["estop", "--address", address]) == 0
        else:
            os.killpg(process.pid, signal.SIGTERM)
            time.sleep(0.2)
            os.killpg(process.pid, signal.SIGINT)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
    assert process.returncode == 3 and f"stopped: estop (from {trigger})" in output, output
    assert "Traceback" not in output, output
    summary = json.loads(report.read_text())
    assert (summary["stopped"], summary["estop"], summary["episodes"][0]["ended"]) == ("estop", trigger, "estop")
    times, goals = follower_goals(tmp_path / "trace.jsonl")
    assert_inside_envelope(goals)
    held = goals[times > requested + 0.1]  # after a tick or two of the envelope easing the target onto the arm
    assert len(held) >= 10 and np.abs(held - held[0]).max() <= TICK_TOLERANCE
    off = [t for t in torque_off_times(tmp_path / "trace.jsonl") if t > requested][0]
    assert 0.5 <= off - requested <= 0.5 + 3 / FPS, off - requested
    assert times.max() < off


def test_dagger_operator_takes_over_with_the_leader_and_the_frames_say_so(policies, tmp_path: Path) -> None:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from zk0.agent.ctl import main as zk0ctl
    from zk0.agent.dataset_commit import read_commit

    address, datasets = f"ipc://{tmp_path}/ctl.sock", tmp_path / "datasets"
    process = subprocess.Popen([sys.executable, "-m", "zk0.cli", *rollout_args(
        tmp_path, str(policies["checkpoint"]), "--dagger", "--episode-time-s", "30", "--record", "dagger",
        "--root", str(datasets))], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        wait_until_driving(process, address)
        assert zk0ctl(["correct", "--address", address]) == 2  # refused: the policy drives, pause first
        paused_at = time.time()
        assert zk0ctl(["pause", "--address", address]) == 0
        time.sleep(1.0)
        corrected_at = time.time()
        assert zk0ctl(["correct", "--address", address]) == 0
        output, _ = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
    assert process.returncode == 0, output
    report = next(line for line in output.splitlines() if line.strip().startswith("episode 0"))
    assert "success=True" in report, report  # the scripted operator finished the task from where the policy left it
    corrected = int(report.split("corrected ")[1].split()[0])
    assert corrected >= 20 * FPS - 30, report  # from the correction to the end of the 30 s episode
    episode = read_commit(datasets / "dagger").episodes[0]
    assert episode.success
    flags = LeRobotDataset("local/dagger", root=datasets / "dagger").hf_dataset["intervention"]
    flags = np.array([bool(np.asarray(f).item()) for f in flags])
    # The policy's own frames first (some flagged where the envelope clamped them), the takeover to the end.
    assert not flags[:-corrected].all() and flags[-corrected:].all() and episode.interventions >= corrected
    trace = [json.loads(line) for line in (tmp_path / "trace.jsonl").read_text().splitlines()]
    leader = [r for r in trace if r["arm"] == "leader" and r["t"] > paused_at - 0.1]
    torque = [(r["t"], r["value"]) for r in leader if r["register"] == "Torque_Enable"]
    assert torque[0][1] == 1 and torque[0][0] < corrected_at  # pause: the leader holds, driven to the follower
    assert any(r["register"] == "Goal_Position" and r["t"] < corrected_at for r in leader)
    assert any(value == 0 and t >= corrected_at - 0.1 for t, value in torque)  # correct: free for the hand
    times, goals = follower_goals(tmp_path / "trace.jsonl")
    assert_inside_envelope(goals)  # the jump from policy to leader pose went through the step bound


def test_validate_on_the_robot_takes_the_operators_verdicts(policies, tmp_path: Path) -> None:
    import yaml

    from zk0.agent.ctl import main as zk0ctl
    from zk0.agent.validate import VALIDATION_SEED_BASE
    from zk0.agent.validate_robot import pair_order
    from zk0.hw.sim.rig_handle import RigHandle

    address, report_dir = f"ipc://{tmp_path}/ctl.sock", tmp_path / "report"
    with RigHandle.start(calibration_dir=tmp_path / "calibration", width=640, height=480) as rig:
        config = yaml.safe_load(CONFIG.read_text())
        config["follower"] = {"port": rig.follower_port, "id": rig.info["follower_id"], "calibration_dir": str(rig.calibration_dir)}
        config["leader"] = {"port": rig.leader_port, "id": rig.info["leader_id"], "calibration_dir": str(rig.calibration_dir)}
        config["cameras"] = [{"name": name, "type": "zmq", "width": cam.width, "height": cam.height, "fps": cam.fps,
                              "host": cam.server_address, "port": cam.port} for name, cam in rig.camera_configs().items()]
        config["record"]["reset_time_s"] = 0.5
        config["validation"] = {"max_episode_s": 3.0, "tasks": ["pick up the red cube, put it in the bin"]}
        (tmp_path / "agent.yaml").write_text(yaml.safe_dump(config))
        process = subprocess.Popen([sys.executable, "-m", "zk0.cli", "validate", "--config", str(tmp_path / "agent.yaml"),
                                    "--policy", str(policies["checkpoint"]), "--against", str(policies["x1e3"]),
                                    "--episodes", "2", "--report", str(report_dir), "--control", address],
                                   cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
        # (pair, episode in pair) -> the verdict, and whether the operator gives it during the episode or after
        plan = {(1, 1): ("success", "episode"), (1, 2): ("fail", "verdict"), (2, 1): ("fail", "episode"),
                (2, 2): ("success", "verdict")}
        try:
            deadline = time.monotonic() + 600
            while plan:
                assert process.poll() is None and time.monotonic() < deadline, process.communicate(timeout=60)[0]
                status = _status(address)
                key = (status.get("pair"), status.get("episode_in_pair"))
                if status.get("step") == "reset" and key == (1, 1):
                    assert zk0ctl(["verdict", "success", "--address", address]) == 2  # no episode waits for one
                if key in plan and status.get("step") == plan[key][1] and (status["step"] != "episode" or status["ticks"]):
                    assert zk0ctl(["verdict", "maybe", "--address", address]) == 2  # refused, nothing recorded
                    assert zk0ctl(["verdict", plan.pop(key)[0], "--address", address]) == 0
                time.sleep(0.2)
            output, _ = process.communicate(timeout=120)
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
    assert process.returncode in (0, 1), output
    report = json.loads((report_dir / "report.json").read_text())
    assert report["settings"]["verdicts"].startswith("operator") and report["settings"]["simulation"] is None
    verdicts = {(1, 1): True, (1, 2): False, (2, 1): False, (2, 2): True}
    for pair in report["pairs"]:
        order = pair_order(VALIDATION_SEED_BASE + pair["index"])
        for number, role in enumerate(order, start=1):
            outcome = pair[role]
            assert outcome["success"] is verdicts[(pair["index"] + 1, number)], (pair, order)
            ended_early = number == 1  # the first episode of each pair got its verdict while running
            assert (outcome["ticks"] < 3 * FPS - 5) is ended_early, outcome
            assert (outcome["time_to_success_s"] is not None) is (ended_early and outcome["success"]), outcome
    assert report["verdict"]["promote"] is (process.returncode == 0)
    assert (report_dir / "report.png").stat().st_size > 0


def _status(address: str) -> dict:
    from zk0.agent.control import request

    try:
        return request(address, "status", timeout_s=0.5)
    except TimeoutError:
        return {}


def wait_until_driving(process: subprocess.Popen, address: str) -> None:
    """Until the rollout's policy drives the arm (the control API answers from before the warm-up), and a second."""
    deadline = time.monotonic() + 300
    while not _policy_driving(address):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate(timeout=60)[0]
        time.sleep(0.5)
    time.sleep(1.0)


def _policy_driving(address: str) -> bool:
    from zk0.agent.control import request

    try:
        return request(address, "status", timeout_s=0.5).get("mode") == "run"
    except TimeoutError:
        return False


def test_watchdog_on_the_bus_holds_a_stalled_policy_then_cuts_torque(tmp_path: Path) -> None:
    from zk0.agent.record import dataset_features
    from zk0.agent.rollout import EnvelopedRobot, Rollout, RolloutPlan
    from zk0.agent.rollout_engines import SyncSource
    from zk0.agent.config import RolloutSettings
    from zk0.agent.rollout_guard import Estop
    from zk0.hw.config import ArmConfig, SafetySettings
    from zk0.hw.realtime import polling, realtime
    from zk0.hw.robots import connect_without_prompt, disconnect_quietly, arm_limits, make_follower
    from zk0.hw.safety import SafetyEnvelope, envelope_spec
    from zk0.hw.sim.rig_handle import RigHandle
    from tests.agent.test_rollout_engines import ScriptedEngine

    trace = tmp_path / "trace.jsonl"
    engine = ScriptedEngine(stall_at=31)  # 30 actions (1, 2, ... 30 degrees), then inference never returns
    with RigHandle.start(cameras=("front",), calibration_dir=tmp_path / "calibration", bus_trace=trace) as rig:
        robot = make_follower(ArmConfig(rig.follower_port, rig.info["follower_id"], rig.calibration_dir), [], 3)
        with realtime(20), polling():  # nice -20: a connect on a saturated test machine still meets lerobot's timeout
            connect_without_prompt(robot)
        try:
            envelope = SafetyEnvelope(envelope_spec(arm_limits(robot), SafetySettings(), FPS))
            plan = RolloutPlan(task=TASK, episodes=1, fps=FPS, episode_time_s=5.0, reset_time_s=0.0,
                               guard=RolloutSettings(watchdog_hold_s=0.2, watchdog_torque_off_s=1.0, estop_hold_s=0.5), policy="stall", calibration_hash="")
            summary = Rollout(EnvelopedRobot(robot, envelope), SyncSource(engine, dataset_features(robot)), plan,
                              Estop()).run()
        finally:
            disconnect_quietly(robot)
    assert summary.stopped.startswith("watchdog"), summary
    times, goals = follower_goals(trace)
    assert_inside_envelope(goals)
    last_action = engine.returned_at
    hold = times[times > last_action + 0.05]
    assert 0.2 <= hold[0] - last_action <= 0.2 + 2 / FPS, hold[0] - last_action
    off = [t for t in torque_off_times(trace) if t > last_action][0]
    assert 1.0 <= off - last_action <= 1.0 + 2 / FPS, off - last_action
    assert np.abs(goals[times > hold[0] + 0.1] - goals[-1]).max() <= TICK_TOLERANCE  # a hold: constant goals
