"""Agent config: valid files parse; every mistake is one line naming the key, and nothing is written."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from zk0.agent.config import (
    AgentConfig,
    ConfigError,
    FederationSettings,
    RolloutSettings,
    ValidationSettings,
    load_config,
    parse_config,
)
from zk0.agent.idle import IdleSettings
from zk0.hw.config import SafetySettings, WorkspaceSettings

REPO = Path(__file__).resolve().parents[2]

VALID = {
    "host_id": "h1",
    "robot_type": "so101",
    "follower": {"port": "/dev/null", "id": "f", "calibration_dir": "/tmp"},
    "leader": {"port": "/dev/null", "id": "l", "calibration_dir": "/tmp"},
    "cameras": [{"name": "front", "type": "opencv", "index_or_path": 0}],
    "record": {"fps": 30, "episode_time_s": 5},
}


def _with(path: tuple, value) -> dict:
    import copy

    raw = copy.deepcopy(VALID)
    node = raw
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return raw


def test_shipped_configs_parse() -> None:
    for name in ("agent.yaml", "agent.so100.example.yaml", "agent.so101.example.yaml"):
        config = load_config(REPO / "configs" / name, check_devices=False)
        assert isinstance(config, AgentConfig)
        assert config.record.fps == 30 and len(config.cameras) == 2
        if name != "agent.yaml":  # the real-arm examples show a federation section
            assert isinstance(config.federation, FederationSettings) and config.federation.insecure is False
    assert load_config(REPO / "configs" / "agent.yaml", check_devices=False).federation is None


def test_federation_section_types() -> None:
    config = parse_config(_with(("federation",), {
        "superlink": "fl:9093", "datasets": ["a", "/abs/b"], "root_certificates": "~/ca.crt", "runtime_port": 9094}))
    federation = config.federation
    assert isinstance(federation, FederationSettings)
    assert federation.datasets == ["a", "/abs/b"] and federation.runtime_port == 9094
    assert federation.root_certificates == Path("~/ca.crt").expanduser() and federation.insecure is False
    assert federation.node_name == "" and federation.policy_store == Path("/var/lib/zk0/policies")
    assert (federation.keep_versions, federation.max_policy_store) == (20, None)


def test_valid_config_types() -> None:
    config = parse_config(VALID)
    assert config.record.episode_time_s == 5.0 and isinstance(config.record.episode_time_s, float)
    assert config.follower.calibration_dir == Path("/tmp")
    assert config.cameras[0].index_or_path == 0


def test_safety_rollout_and_validation_defaults_and_values() -> None:
    config = parse_config(VALID)
    assert config.safety == SafetySettings(10.0, 10.0, 180.0, 200.0, None)
    assert config.rollout == RolloutSettings(0.2, 1.0, 0.5, "sync")
    assert config.validation == ValidationSettings(20, 0.05, 20.0, [])
    raw = {**VALID, "safety": {"max_step_deg": 5, "workspace": {"lower": [0.05, -0.3, 0.0], "upper": [0.4, 0.3, 0.35]}},
           "rollout": {"inference": "rtc", "watchdog_torque_off_s": 2}, "validation": {"tasks": ["pick the red cube"]}}
    config = parse_config(raw)
    assert config.safety.max_step_deg == 5.0 and isinstance(config.safety.max_step_deg, float)
    assert config.safety.workspace == WorkspaceSettings([0.05, -0.3, 0.0], [0.4, 0.3, 0.35])
    assert config.rollout.inference == "rtc" and config.rollout.watchdog_torque_off_s == 2.0
    assert config.validation.tasks == ["pick the red cube"]


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("colour",), "red", "colour: unknown key"),
        (("record", "fsp"), 30, "record.fsp: unknown key"),
        (("record", "fps"), "thirty", "record.fps: expected int, got str"),
        (("robot_type",), "so102", "robot_type: must be one of so100, so101"),
        (("follower", "port"), KeyError, "follower.port: missing required key"),
        (("cameras",), [{"name": "a", "index_or_path": 0, "width": "wide"}], "cameras[0].width: expected int"),
        (("cameras",), [{"name": "a"}], "cameras[0].index_or_path: required"),
        (("safety",), {"max_relative_target": 20}, "safety.max_relative_target: unknown key"),
        (("safety",), {"max_step_deg": -1}, "safety.max_step_deg: must be positive, got -1"),
        (("safety",), {"max_gripper_velocity": 0}, "safety.max_gripper_velocity: must be positive, got 0"),
        (("safety",), {"max_velocity_deg_s": ".nan"}, "safety.max_velocity_deg_s: expected float, got str"),
        (("safety",), {"workspace": {"lower": [0, 0], "upper": [1, 1, 1]}},
         "safety.workspace.lower: expected three finite numbers"),
        (("safety",), {"workspace": {"lower": [0, 0, 0.5], "upper": [1, 1, 0.2]}},
         "safety.workspace.lower: must be below upper on every axis"),
        (("safety",), {"workspace": {"lower": [0, 0, 0]}}, "safety.workspace.upper: missing required key"),
        (("rollout",), {"watchdog_hold_s": 0}, "rollout.watchdog_hold_s: must be positive, got 0"),
        (("rollout",), {"watchdog_hold_s": 2.0}, "rollout.watchdog_hold_s: must be below watchdog_torque_off_s (1.0)"),
        (("rollout",), {"estop_hold_s": -0.5}, "rollout.estop_hold_s: must be positive"),
        (("rollout",), {"inference": "async"}, "rollout.inference: must be one of sync, rtc"),
        (("rollout",), {"backend": "onnxruntime", "inference": "rtc"},
         "rollout.backend: onnxruntime cannot run rtc inference"),
        (("rollout",), {"backend": "tensorrt"}, "rollout.backend: must be one of torch, onnxruntime"),
        (("rollout",), {"onnx_steps": 0}, "rollout.onnx_steps: at least 1"),
        (("validation",), {"episodes": 0}, "validation.episodes: must be positive, got 0"),
        (("validation",), {"promotion_margin": 1.5}, "validation.promotion_margin: must be in [0, 1)"),
        (("validation",), {"max_episode_s": 0}, "validation.max_episode_s: must be positive"),
        (("validation",), {"tasks": ["pick", " "]}, "validation.tasks: task instructions must not be empty"),
        (("leader",), "COM3", "leader: expected a mapping"),
        (("federation",), {"superlink": "h:1", "datasets": ["a"], "insecure": "false"},
         "federation.insecure: expected bool, got str 'false'"),
        (("federation",), {"superlink": "h:1", "datasets": ["a"], "insecure": True, "colour": 1},
         "federation.colour: unknown key"),
        (("federation",), {"superlink": "h:1", "datasets": "a", "insecure": True, "runtime_port": 1.5},
         "federation.runtime_port: expected int, got float 1.5"),
        (("federation",), {"superlink": "h:1", "datasets": ["a"]},
         "federation.root_certificates: required unless insecure is true"),
        (("federation",), {"superlink": "h:1", "datasets": ["a"], "insecure": True, "keep_versions": 0},
         "federation.keep_versions: at least 1 (or null: keep every version), got 0"),
        (("federation",), {"superlink": "h:1", "datasets": ["a"], "insecure": True, "max_policy_store": "lots"},
         "federation.max_policy_store: not a size: 'lots' (e.g. 500M, 2G)"),
        (("idle",), {"quiet": 5}, "idle.quiet: unknown key"),
        (("idle",), {"quiet_time_s": "5m"}, "idle.quiet_time_s: expected float, got str '5m'"),
        (("idle",), {"quiet_time_s": -1}, "idle.quiet_time_s: must be a number >= 0, got -1.0"),
        (("idle",), {"training_hours": ["22:00-06:00"]}, "idle.training_hours: expected a mapping, got list"),
        (("idle",), {"training_hours": {"mon": ["22-06"]}},
         'idle.training_hours.mon[0]: expected "HH:MM-HH:MM" (24:00 may end a window), got \'22-06\''),
        (("idle",), {"training_hours": {"weekend": ["00:00-24:00"]}}, "idle.training_hours.weekend: unknown weekday"),
        (("idle",), {"training_hours": {"daily": ["08:00-08:00"]}}, "idle.training_hours.daily[0]: an empty window"),
        (("idle",), {"max_load_per_core": -0.5}, "idle.max_load_per_core: must be a number >= 0 or null, got -0.5"),
        (("idle",), {"min_free_disk_mb": 1.5}, "idle.min_free_disk_mb: expected int, got float 1.5"),
        (("idle",), {"require_ac_power": "yes"}, "idle.require_ac_power: expected bool, got str 'yes'"),
        (("idle",), {"lease_ttl_s": 0}, "idle.lease_ttl_s: must be a number in (0, 3600], got 0.0"),
        (("idle",), {"lease_ttl_s": 86400}, "idle.lease_ttl_s: must be a number in (0, 3600], got 86400.0"),
    ],
)
def test_mistakes_name_the_key(path: tuple, value, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_with(path, value), source="agent.yaml")
    text = str(info.value)
    assert message in text and text.startswith("agent.yaml: ") and "\n" not in text


def test_idle_section_defaults_and_values() -> None:
    assert parse_config(VALID).idle == IdleSettings() == parse_config({**VALID, "idle": None}).idle
    assert IdleSettings().training_hours == {"daily": ["00:00-24:00"]}
    config = parse_config({**VALID, "idle": {
        "training_hours": {"daily": ["22:00-07:00"], "sat": ["00:00-24:00"], "sun": []},
        "quiet_time_s": 600, "max_load_per_core": None, "min_free_disk_mb": 4096, "require_ac_power": False,
        "lease_ttl_s": 30}})
    idle = config.idle
    assert idle.training_hours == {"daily": ["22:00-07:00"], "sat": ["00:00-24:00"], "sun": []}
    assert idle.quiet_time_s == 600.0 and isinstance(idle.quiet_time_s, float) and idle.max_load_per_core is None
    assert (idle.min_free_disk_mb, idle.require_ac_power, idle.lease_ttl_s) == (4096, False, 30.0)
    assert idle.min_free_memory_mb == 1024 and idle.max_temperature_c == 85.0


def test_shipped_configs_document_the_idle_defaults() -> None:
    import yaml

    # The real-arm examples spell the section out with the defaults; agent.yaml carries it commented out.
    for name in ("agent.so100.example.yaml", "agent.so101.example.yaml"):
        assert "idle" in yaml.safe_load((REPO / "configs" / name).read_text())
        assert load_config(REPO / "configs" / name, check_devices=False).idle == IdleSettings()
    text = (REPO / "configs" / "agent.yaml").read_text()
    commented = "\n".join(line.removeprefix("# ") for line in text[text.index("# idle:"):].splitlines())
    assert parse_config({**VALID, **yaml.safe_load(commented)}).idle == IdleSettings()


def test_missing_device_is_named(tmp_path: Path) -> None:
    import yaml

    raw = _with(("follower", "port"), str(tmp_path / "ttyACM9"))
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"follower.port: device .*ttyACM9 not found"):
        load_config(path)


def test_cli_reports_one_line_and_writes_nothing(tmp_path: Path) -> None:
    import yaml

    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump(_with(("record", "fps"), 30.5)))
    datasets = tmp_path / "datasets"
    result = subprocess.run(
        [sys.executable, "-m", "zk0.cli", "record", "--config", str(config), "--dataset", "d", "--task", "t",
         "--episodes", "1", "--root", str(datasets)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"zk0 record: {config}: record.fps: expected int, got float 30.5"]
    assert not datasets.exists()


def test_record_cli_parses_arguments() -> None:
    from zk0.agent import record_cli

    parser = argparse.ArgumentParser()
    record_cli.add_arguments(parser)
    args = parser.parse_args(["--dataset", "d", "--task", "pick", "--episodes", "3", "--sim", "--episode-time-s", "4"])
    assert (args.dataset, args.episodes, args.sim, args.episode_time_s, args.reset_time_s) == ("d", 3, True, 4.0, None)
    assert args.write_calibration is False
    assert parser.parse_args(["--dataset", "d", "--task", "t", "--episodes", "1", "--write-calibration"]).write_calibration
