"""The experiment's recording settings: each session's agent config and a host's datasets' summary."""

from __future__ import annotations

import yaml

from zk0.cli.experiment_data import agent_config, demonstration_summary
from zk0.cli.experiment_plan import default_hosts, quick


def test_agent_config_is_the_shipped_one_with_small_cameras_and_its_own_socket(tmp_path):
    host = default_hosts()[2]
    path = agent_config(host, "push_blue_left", quick(), tmp_path / "agent.yaml")
    raw = yaml.safe_load(path.read_text())
    assert raw["host_id"] == "mixed" and raw["robot_type"] == "so101"
    assert [(c["name"], c["width"], c["height"], c["fps"]) for c in raw["cameras"]] == [
        ("front", 128, 96, 30), ("wrist", 128, 96, 30)]
    assert raw["control_address"].endswith("-mixed-push_blue_left.sock")
    from zk0.agent.config import load_config

    assert load_config(path, check_devices=False).host_id == "mixed"  # the recorder accepts it


def test_summary_of_no_datasets():
    assert demonstration_summary([]) == {"episodes": 0, "successes": 0, "seeds": None, "bytes": 0, "datasets": []}
