"""Server config: the shipped YAML loads, run-config overrides apply, and every mistake is one line."""

from pathlib import Path

import pytest

from zk0.server.config import (
    ConfigError,
    load_server_config,
    parse_server_config,
    server_config_from_run_config,
)

REPO = Path(__file__).resolve().parents[2]


def test_shipped_server_yaml_loads_with_design_numbers():
    config = load_server_config(REPO / "configs" / "server.yaml")
    s = config.scheduler
    assert (s.t0, s.t_mult, s.eta_min, s.max_lr) == (15, 2, 5e-7, 2e-4)
    assert (s.plateau_window, s.plateau_min_improvement, s.plateau_boost) == (5, 0.01, 1.15)
    assert (s.spike_window, s.spike_rise, s.mu_decay, s.mu_min) == (3, 0.5, 0.98, 0.001)
    assert (s.unstable_loss_std, s.unstable_client_mu) == (1.2, 0.02)
    assert config.validation.norm_bound_multiple == 10


def test_run_config_round_trip_with_overrides(tmp_path):
    config = parse_server_config({"evaluation": {"datasets": ["/a", "/b"]}, "validation": {"max_update_norm": 5.0}})
    run_config = config.run_config(None) | {"lr": 5e-5, "num-server-rounds": 7}
    back = server_config_from_run_config(run_config)
    assert back.scheduler.base_lr == 5e-5 and back.training.rounds == 7
    assert back.evaluation.datasets == ["/a", "/b"]
    assert back.validation.max_update_norm == 5.0
    assert back.validation.norm_bound_multiple == 10.0  # on by default
    unbounded = server_config_from_run_config(parse_server_config({}).run_config(None))
    assert unbounded.validation.max_update_norm is None


def test_relative_norm_bound_travels_in_the_run_config_and_0_turns_it_off():
    config = parse_server_config({"validation": {"norm_bound_multiple": None}})
    assert config.run_config(None)["norm-bound-multiple"] == 0
    assert server_config_from_run_config(config.run_config(None)).validation.norm_bound_multiple is None
    tighter = server_config_from_run_config({"norm-bound-multiple": 4})
    assert tighter.validation.norm_bound_multiple == 4


def test_run_config_reads_the_named_file(tmp_path):
    path = tmp_path / "server.yaml"
    path.write_text("training:\n  local_steps: 3\n")
    config = server_config_from_run_config({"server-config": str(path), "batch-size": 2})
    assert (config.training.local_steps, config.training.batch_size) == (3, 2)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"training": {"rounds": 0}}, "training.rounds: must be >= 1"),
        ({"training": {"rounds": "3"}}, "training.rounds: expected int, got str '3'"),
        ({"training": {"codec": "zip"}}, "training.codec: must be one of"),
        ({"scheduler": {"t0": 0}}, "scheduler.t0 must be >= 1"),
        ({"validation": {"aggregation": "mean"}}, "validation.aggregation: must be one of fedavg"),
        ({"validation": {"trim_fraction": 0.5}}, "validation.trim_fraction: must be in (0, 0.5)"),
        ({"validation": {"trim_fraction": 0.0}}, "validation.trim_fraction: must be in (0, 0.5)"),
        ({"validation": {"norm_bound_multiple": 0.5}}, "validation.norm_bound_multiple: must be >= 1 or null"),
        ({"nodes": {"fraction_train": 0}}, "nodes.fraction_train"),
        ({"bogus": 1}, "bogus: unknown key"),
        ({"training": {"stepz": 1}}, "training.stepz: unknown key"),
    ],
)
def test_invalid_values_give_one_clear_line(raw, message):
    with pytest.raises(ConfigError) as info:
        parse_server_config(raw)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_override_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="nope: unknown override"):
        parse_server_config({}, {"nope": 1})
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_server_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_server_config(tmp_path / "missing.yaml")
