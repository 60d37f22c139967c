"""`zk0 validate`: tiny SmolVLA policies (built on a dataset recorded in the simulation, so their cameras are
the sim's) on paired lock-step episodes; replay under load; refusals; the end-to-end gate with --promote."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.agent.validate_fixtures import CAMERAS, FPS, record_sim_dataset
from zk0.agent import validate_cli

REPO = Path(__file__).resolve().parents[2]
TASKS = ("pick_place_red", "push_blue_left")


@pytest.fixture(scope="module")
def sim_meta(tmp_path_factory):
    return record_sim_dataset(tmp_path_factory.mktemp("validate") / "sim_pick", "pick_place_red")


@pytest.fixture(scope="module")
def bundles(sim_meta):
    from zk0.learn.policy import PolicySpec, seeded_policy_bundle

    spec = PolicySpec(model="tiny", chunk_size=10, n_action_steps=10)
    return [seeded_policy_bundle(spec, sim_meta, seed) for seed in (0, 1)]


def _args(**overrides) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    validate_cli.add_arguments(parser)
    args = parser.parse_args(["--policy", "x", "--report", "r"])
    return argparse.Namespace(**{**vars(args), **overrides})


def test_on_the_robot_it_needs_the_robots_config_and_keeps_free_text_tasks(capsys, tmp_path):
    assert validate_cli.run(_args(sim=False, task=["wipe the table"])) == 2  # the default /etc/zk0/agent.yaml is absent
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(validate_cli.ROBOT_CONFIG) in err
    path = tmp_path / "agent.yaml"
    path.write_text((REPO / "configs" / "agent.yaml").read_text())
    setup = validate_cli._setup(_args(sim=False, config=path, task=["wipe the table", "wipe the table"]))
    assert setup.tasks == ["wipe the table"] and setup.settings()["verdicts"].startswith("operator")


@pytest.mark.parametrize(("overrides", "message"), [
    ({"task": ["juggle the cubes"]}, "matches no simulated task"),
    ({"task": []}, "no tasks to validate on"),
    ({"task": ["pick_place_red"], "episodes": 0}, "--episodes must be positive"),
    ({"task": ["pick_place_red"], "promote": True}, "--promote needs a policy store"),
    ({"task": ["pick_place_red"], "policy": "v1"}, "no policy store is configured"),
])
def test_bad_requests_are_refused_in_one_line_before_anything_runs(capsys, overrides, message):
    assert validate_cli.run(_args(sim=True, **overrides)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_tasks_come_from_the_option_then_the_config_then_the_federation_datasets(tmp_path):
    from zk0.agent.dataset_commit import CommitRecord, DatasetIdentity, write_commit

    dataset = tmp_path / "datasets" / "mixed"
    (dataset / "meta").mkdir(parents=True)
    write_commit(dataset, CommitRecord(DatasetIdentity("h", "so101", "c"),
                                       tasks=["push the green cube right", "pick the red cube and place it in the bin"]))
    config = yaml.safe_load((REPO / "configs" / "agent.yaml").read_text())
    config["federation"] = {"superlink": "127.0.0.1:9092", "datasets": [str(dataset)], "insecure": True,
                            "policy_store": str(tmp_path / "store")}
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    setup = validate_cli._setup(_args(sim=True, config=path, task=[]))
    assert setup.tasks == ["push_green_right", "pick_place_red"] and setup.store == tmp_path / "store"
    assert setup.host == config["host_id"] and setup.episodes == 20 and setup.max_episode_s == 20.0
    config["validation"] = {"tasks": ["push the blue cube left"], "episodes": 4}
    path.write_text(yaml.safe_dump(config))
    assert validate_cli._setup(_args(sim=True, config=path, task=[])).tasks == ["push_blue_left"]
    setup = validate_cli._setup(_args(sim=True, config=path, task=["pick_place_green", "pick the green cube and place it in the bin"]))
    assert (setup.tasks, setup.episodes) == (["pick_place_green"], 4)


def _burn(seconds: float) -> None:
    import time

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


@pytest.fixture
def one_torch_thread():
    """Two intra-op threads on two cores shared with CPU burners (and whatever else runs) slow a tiny model
    down tenfold without changing a result; one keeps the test short."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_policy_episodes_replay_exactly_even_on_a_loaded_machine(bundles, one_torch_thread):
    from zk0.agent.lockstep import PolicyController, run_episode
    from zk0.hw.config import SafetySettings
    from zk0.hw.safety import SafetyEnvelope, envelope_spec
    from zk0.hw.sim.lockstep import LockstepSim, follower_limits

    spec = envelope_spec(follower_limits(), SafetySettings(), FPS)
    controller = PolicyController(bundles[0], "so101_follower")

    def episode(seed: int):
        return run_episode(LockstepSim(CAMERAS, FPS), controller, SafetyEnvelope(spec), "pick_place_red", seed, 25)

    quiet = episode(1_000_000)
    burners = [multiprocessing.Process(target=_burn, args=(30.0,)) for _ in range(2)]
    for burner in burners:
        burner.start()
    try:
        loaded = episode(1_000_000)
    finally:
        for burner in burners:
            burner.terminate()
            burner.join()
    assert loaded == quiet
    assert episode(1_000_001).trajectory_sha256 != quiet.trajectory_sha256  # the seed matters: noise and scene
    other = PolicyController(bundles[1], "so101_follower")
    paired = run_episode(LockstepSim(CAMERAS, FPS), other, SafetyEnvelope(spec), "pick_place_red", 1_000_000, 25)
    assert paired.trajectory_sha256 != quiet.trajectory_sha256  # and so does the policy


@pytest.fixture
def store(tmp_path, bundles):
    """A policy store holding both tiny policies: tiny-round0 (active, the first version) and tiny-round1."""
    from zk0.agent.policy_store import PolicyStore
    from zk0.learn.codec import tensors_sha256
    from zk0.learn.policy import trainable_state

    store = PolicyStore(tmp_path / "store")
    for round_, bundle in enumerate(bundles):
        store.add_from_bundle(bundle, run="tiny", round=round_, stats=None, server_metrics={},
                              global_sha256=tensors_sha256(trainable_state(bundle.policy)))
    return store


@pytest.mark.slow
def test_zk0_validate_sim_end_to_end_writes_the_record_and_promotes(tmp_path, store):
    config = yaml.safe_load((REPO / "configs" / "agent.yaml").read_text())
    config["validation"] = {"episodes": 20, "promotion_margin": 0.05, "max_episode_s": 1.0}
    config_path = tmp_path / "agent.yaml"
    config_path.write_text(yaml.safe_dump(config))
    report_dir = tmp_path / "report"
    command = [sys.executable, "-m", "zk0.cli", "validate", "--sim", "--policy", "tiny-round1", "--against", "active",
               "--task", TASKS[0], "--task", "push the blue cube left", "--report", str(report_dir), "--promote",
               "--store", str(store.root), "--config", str(config_path)]
    # one torch thread: two would fight over the two cores with everything else running here
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    progress = [line for line in result.stdout.splitlines() if line.startswith("pair ")]
    assert len(progress) == 20 and progress[0].startswith(f"pair 1/20 {TASKS[0]} seed 1000000: candidate ")

    report = json.loads((report_dir / "report.json").read_text())
    assert report["verdict"]["promote"] and report["verdict"]["promoted"]
    assert report["tasks"] == list(TASKS)
    assert [(p["task"], p["seed"]) for p in report["pairs"]] == [(TASKS[i % 2], 1_000_000 + i) for i in range(20)]
    assert report["policies"]["candidate"]["version"] == "tiny-round1"
    assert report["policies"]["active"]["version"] == "tiny-round0"
    for role in ("candidate", "active"):
        described = report["policies"][role]
        assert described["sha256"] == json.loads((Path(described["path"]) / "zk0.json").read_text())["sha256"]
        summary = report["summary"][role]["all"]
        assert summary["episodes"] == 20 and 0 <= summary["interval_95"][0] <= summary["interval_95"][1] <= 1
    assert report["settings"]["max_episode_s"] == 1.0 and report["settings"]["safety"]["max_step_deg"] > 0
    assert all(p[role]["ticks"] <= FPS for p in report["pairs"] for role in ("candidate", "active"))
    assert (report_dir / "report.png").stat().st_size > 10_000
    state = store.state()
    assert state.active == "tiny-round1" and state.previous == "tiny-round0"
    assert str((report_dir / "report.json").resolve()) in json.dumps(state.history[-1])
    print(f"\n{report['seconds_per_episode']} s per episode; candidate {report['summary']['candidate']['all']}")


@pytest.mark.slow
def test_zk0_validate_sim_runs_the_policies_on_onnxruntime_when_asked(tmp_path, store):
    """`--backend onnxruntime` (or the config's rollout.backend): both policies are exported once (cached under
    $XDG_CACHE_HOME/zk0/onnx) and judged on onnxruntime; the report says which backend computed the actions."""
    config = yaml.safe_load((REPO / "configs" / "agent.yaml").read_text())
    config["validation"] = {"episodes": 2, "max_episode_s": 1.0}
    config["rollout"] = {"backend": "onnxruntime"}
    config_path = tmp_path / "agent.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path),
           "XDG_CACHE_HOME": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "zk0.cli", "validate", "--sim", "--policy", "tiny-round1", "--against",
               "tiny-round0", "--task", TASKS[0], "--report", str(tmp_path / "report"), "--store", str(store.root),
               "--config", str(config_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["settings"]["backend"] == "onnxruntime" and len(report["pairs"]) == 2
    assert len(list((tmp_path / "cache" / "zk0" / "onnx").glob("*/manifest.json"))) == 2  # one export per policy
