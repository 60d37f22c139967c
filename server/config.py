"""Server configuration: `configs/server.yaml` plus Flower run-config overrides, validated up front.

The YAML file holds every setting in sections (see configs/server.yaml). The most-tuned ones also
travel as flat keys in Flower's run config (`flwr run -c 'lr=5e-5 num-server-rounds=50'`), where
they override the file: `RUN_CONFIG_KEYS` maps each flat key to its place in the config. Every
mistake is reported as one `ConfigError` line naming the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from zk0.common.typed_yaml import ConfigError, build

from zk0.server.schedule import ScheduleConfig

AGGREGATIONS = ("fedavg", "trimmed-mean", "median")
CODECS = ("fp32", "bf16", "int8-delta", "int8-delta-row")


@dataclass(frozen=True)
class TrainingConfig:
    rounds: int = 30
    local_steps: int = 50
    batch_size: int = 8
    model: str = "base"  # base | tiny | full-random | checkpoint path (see zk0.learn.policy)
    codec: str = "fp32"
    seed: int = 0
    eval_fraction: float = 0.2  # held-out episodes per dataset, on nodes and on the server


@dataclass(frozen=True)
class NodesConfig:
    min_nodes: int = 2
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    round_timeout_s: float = 3600.0


@dataclass(frozen=True)
class ValidationConfig:
    # Reject an update farther (L2 over all tensors) from the global than this multiple of the round's reference
    # distance (the lower median over the round's decoded updates; see zk0.server.aggregation.norm_rejections).
    norm_bound_multiple: float | None = 10.0  # None: no relative bound
    max_update_norm: float | None = None  # absolute bound on the same distance; None: no bound
    aggregation: Literal["fedavg", "trimmed-mean", "median"] = "fedavg"
    trim_fraction: float = 0.2  # per side, for trimmed-mean (at least one per side from 3 updates)


@dataclass(frozen=True)
class EvaluationConfig:
    datasets: list[str] = field(default_factory=list)  # held-out LeRobot dataset roots on the server
    max_samples: int = 64
    patience: int = 0  # rounds without improvement before stopping; 0: never stop early
    min_delta: float = 0.0


@dataclass(frozen=True)
class DeploymentConfig:
    host: str = "0.0.0.0"
    port: int = 9093
    certs_dir: Path = Path("certs")
    run_timeout_s: float = 7 * 24 * 3600.0


@dataclass(frozen=True)
class ServerConfig:
    run_dir: Path = Path("runs/zk0")
    training: TrainingConfig = field(default_factory=TrainingConfig)
    nodes: NodesConfig = field(default_factory=NodesConfig)
    scheduler: ScheduleConfig = field(default_factory=ScheduleConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    deployment: DeploymentConfig = field(default_factory=DeploymentConfig)

    def run_config(self, config_file: Path | None) -> dict[str, bool | int | float | str]:
        """Flower run config for this configuration (flat keys; the file for everything else)."""
        values: dict[str, bool | int | float | str] = {"server-config": str(config_file or "")}
        for key, (section, name) in RUN_CONFIG_KEYS.items():
            value = getattr(getattr(self, section), name) if section else getattr(self, name)
            if value is None:
                value = 0  # Flower run config has no null; 0 reads back as "no bound"
            values[key] = ",".join(value) if isinstance(value, list) else (str(value) if isinstance(value, Path) else value)
        return values


# flat Flower run-config key -> (section, field); section "" is a top-level field
RUN_CONFIG_KEYS: dict[str, tuple[str, str]] = {
    "run-dir": ("", "run_dir"),
    "num-server-rounds": ("training", "rounds"),
    "local-steps": ("training", "local_steps"),
    "batch-size": ("training", "batch_size"),
    "model": ("training", "model"),
    "codec": ("training", "codec"),
    "seed": ("training", "seed"),
    "lr": ("scheduler", "base_lr"),
    "mu": ("scheduler", "base_mu"),
    "min-nodes": ("nodes", "min_nodes"),
    "fraction-train": ("nodes", "fraction_train"),
    "fraction-evaluate": ("nodes", "fraction_evaluate"),
    "round-timeout": ("nodes", "round_timeout_s"),
    "aggregation": ("validation", "aggregation"),
    "max-update-norm": ("validation", "max_update_norm"),
    "norm-bound-multiple": ("validation", "norm_bound_multiple"),
    "eval-datasets": ("evaluation", "datasets"),
    "patience": ("evaluation", "patience"),
}
# Flower run config has no null: 0 in these keys means "no bound"
_ZERO_IS_NULL = {"max-update-norm", "norm-bound-multiple"}
# `zk0 fleet` and tests override by field name; these are the ones outside their section's name
_SHORT_OVERRIDES = {"rounds": ("training", "rounds"), "model": ("training", "model"),
                    "run_dir": ("", "run_dir"), "eval_datasets": ("evaluation", "datasets"),
                    "min_nodes": ("nodes", "min_nodes"), "local_steps": ("training", "local_steps"),
                    "batch_size": ("training", "batch_size"), "codec": ("training", "codec")}


def _check(config: ServerConfig) -> None:
    t, n, v, e = config.training, config.nodes, config.validation, config.evaluation
    checks = [
        (t.rounds >= 1, "training.rounds: must be >= 1"),
        (t.local_steps >= 1, "training.local_steps: must be >= 1"),
        (t.batch_size >= 1, "training.batch_size: must be >= 1"),
        (t.codec in CODECS, f"training.codec: must be one of {', '.join(CODECS)}, got {t.codec!r}"),
        (0 <= t.eval_fraction < 1, "training.eval_fraction: must be in [0, 1)"),
        (n.min_nodes >= 1, "nodes.min_nodes: must be >= 1"),
        (0 < n.fraction_train <= 1, "nodes.fraction_train: must be in (0, 1]"),
        (0 <= n.fraction_evaluate <= 1, "nodes.fraction_evaluate: must be in [0, 1]"),
        (n.round_timeout_s > 0, "nodes.round_timeout_s: must be > 0"),
        (v.max_update_norm is None or v.max_update_norm > 0, "validation.max_update_norm: must be > 0 or null"),
        (v.norm_bound_multiple is None or v.norm_bound_multiple >= 1,
         "validation.norm_bound_multiple: must be >= 1 or null"),
        (0 < v.trim_fraction < 0.5, "validation.trim_fraction: must be in (0, 0.5)"),
        (e.patience >= 0, "evaluation.patience: must be >= 0"),
        (e.max_samples >= 1, "evaluation.max_samples: must be >= 1"),
        (0 < config.deployment.port < 65536, "deployment.port: must be in 1..65535"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _apply(raw: dict[str, Any], section: str, name: str, value: Any) -> None:
    if section:
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{section}: expected a mapping")
        raw[section][name] = value
    else:
        raw[name] = value


def parse_server_config(raw: Any, overrides: Mapping[str, Any] | None = None) -> ServerConfig:
    """Build and validate a config from YAML data; `overrides` use run-config keys or short field names."""
    raw = dict(raw or {}) if isinstance(raw, Mapping) or raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping, got {type(raw).__name__}")
    raw = {k: dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
    for key, value in (overrides or {}).items():
        target = RUN_CONFIG_KEYS.get(key) or _SHORT_OVERRIDES.get(key)
        if target is None:
            raise ConfigError(f"{key}: unknown override (known: {', '.join(sorted(RUN_CONFIG_KEYS))})")
        if key in _ZERO_IS_NULL and value == 0:
            value = None
        _apply(raw, *target, value)
    config = build(ServerConfig, raw)
    _check(config)
    return config


def load_server_config(path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> ServerConfig:
    """Read `path` (None or a missing default: built-in defaults) and apply `overrides`."""
    raw: Any = {}
    if path:
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            raise ConfigError(f"{path}: not valid YAML{f' at line {mark.line + 1}' if mark else ''}") from None
    try:
        return parse_server_config(raw, overrides)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}" if path else str(err)) from None


def server_config_from_run_config(run_config: Mapping[str, Any]) -> ServerConfig:
    """What the ServerApp runs with: the file named by `server-config`, overridden by the flat keys."""
    overrides = {k: v for k, v in run_config.items() if k in RUN_CONFIG_KEYS}
    return load_server_config(run_config.get("server-config") or None, overrides)
