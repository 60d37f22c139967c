"""bench/task_discrimination.py: its pure parts, and a tiny run of every controller."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from zk0.agent.validate import VALIDATION_SEED_BASE

_PATH = Path(__file__).resolve().parents[2] / "bench" / "task_discrimination.py"
_spec = importlib.util.spec_from_file_location("task_discrimination", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_mean_trajectory_pads_each_demonstration_with_its_last_pose():
    short = np.array([[0.0, 10.0], [2.0, 10.0]])
    long = np.array([[4.0, 0.0], [6.0, 0.0], [8.0, 2.0], [10.0, 4.0]])
    np.testing.assert_allclose(bench.mean_trajectory([short, long]), [[2, 5], [4, 5], [5, 6], [6, 7]])
    with pytest.raises(ValueError):
        bench.mean_trajectory([])


def test_replay_is_open_loop_and_holds_its_last_target():
    replay = bench.Replay(np.array([[1.0], [2.0]]))
    replay.reset(None, 0)
    assert [float(replay.act(None)[0]) for _ in range(4)] == [1.0, 2.0, 2.0, 2.0]
    replay.reset(None, 1)
    assert float(replay.act(None)[0]) == 1.0


def test_judged_seeds_are_disjoint_from_recording_and_validation():
    assert bench.SEED_BASE >= 2 * VALIDATION_SEED_BASE


def test_dataset_meta_carries_joint_features_cameras_and_the_demonstrations_statistics():
    states = np.arange(12.0).reshape(2, 6)
    meta = bench.dataset_meta(states, states + 1)
    assert meta.features["observation.images.front"]["shape"] == (48, 64, 3)
    np.testing.assert_allclose(meta.stats["action"]["mean"], states.mean(axis=0) + 1)
    np.testing.assert_allclose(meta.stats["observation.state"]["std"], np.full(6, 3.0))


def _result(scripted: float, untrained: float, replay: float) -> dict:
    return {"scripted": {"success_rate": scripted}, "untrained": {"success_rate": untrained},
            "mean_replay": {"success_rate": replay}}


@pytest.mark.parametrize(("rates", "expected"), [
    ((0.9, 0.05, 0.0), True), ((0.89, 0.0, 0.0), False), ((1.0, 0.06, 0.0), False), ((1.0, 0.0, 0.06), False),
])
def test_verdict_needs_both_blind_controllers_low_and_the_operator_high(rates, expected):
    assert bench.verdict(_result(*rates)) is expected
    assert bench.verdict({"scripted": {"success_rate": 1.0}}) is None


def test_every_controller_runs_a_short_episode():
    result = bench.discriminate("push_red_left", episodes=1, demos=1, max_episode_s=0.5, policy_seed=0)
    assert result["demonstrations"] == {"episodes": 1, "successes": 0}
    for arm in bench.ARMS:
        assert result[arm]["episodes"] == 1 and result[arm]["successes"] == 0
        assert "table_contacts" in result[arm]


def test_quick_run_prints_one_json_object(capsys):
    assert bench.main(["--quick", "--task", "pick_place_red", "--arm", "scripted", "--arm", "mean_replay"]) == 0
    report = json.loads(capsys.readouterr().out)
    task = report["tasks"]["pick_place_red"]
    assert report["settings"]["episodes"] == 3 and task["demonstrations"]["episodes"] == 3
    assert task["scripted"]["episodes"] == 3 and "untrained" not in task and task["discriminative"] is None
    assert report["all_discriminative"] is None
