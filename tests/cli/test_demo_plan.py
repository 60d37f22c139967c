"""zk0 demo's plan: task mixes, episode splits, seeds, settings, the agent and server configs (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from zk0.cli.demo_plan import (
    FULL, HOST_SEED_STRIDE, DemoSettings, agent_config, host_plans, host_tasks, server_yaml,
    settings_from, sim_base_dir, split_episodes,
)
from zk0.hw.sim.tasks import TASKS

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("index, tasks", [
    (0, ("pick_place_red",)), (1, ("push_blue_left",)), (2, ("pick_place_red", "push_blue_left")),
    (3, ("pick_place_blue",)), (4, ("push_red_right",)), (5, ("pick_place_blue", "push_red_right")),
])
def test_hosts_pick_push_and_mix_in_turn(index: int, tasks: tuple[str, ...]) -> None:
    assert host_tasks(index) == tasks


def test_every_task_of_every_mix_is_simulated() -> None:
    assert {t for i in range(24) for t in host_tasks(i)} <= set(TASKS)


@pytest.mark.parametrize("tasks, episodes, split", [
    (("a",), 4, [("a", 4)]),
    (("a", "b"), 4, [("a", 2), ("b", 2)]),
    (("a", "b"), 5, [("a", 3), ("b", 2)]),
    (("a", "b"), 1, [("a", 1)]),  # a task that gets no episode has no session
])
def test_episodes_are_split_evenly(tasks, episodes, split) -> None:
    assert split_episodes(tasks, episodes) == split


def test_host_plans_name_hosts_and_keep_seeds_apart() -> None:
    plans = host_plans(DemoSettings(hosts=3, episodes=3))
    assert [p.name for p in plans] == ["host1", "host2", "host3"]
    first = 2 * HOST_SEED_STRIDE
    assert plans[2].sessions == (("pick_place_red", 2, first), ("push_blue_left", 1, first + 2))
    seeds = [seed + i for p in plans for _, n, seed in p.sessions for i in range(n)]
    assert len(seeds) == len(set(seeds)) and max(seeds) < 1_000_000  # validation seeds start at 1_000_000


def test_settings_take_the_given_options_only() -> None:
    assert settings_from({"hosts": 2, "rounds": None}, full=False) == DemoSettings(hosts=2)
    assert settings_from({"rounds": 2}, full=True) == DemoSettings(**{**FULL.__dict__, "rounds": 2})
    with pytest.raises(ValueError, match="--hosts"):
        settings_from({"hosts": 0}, full=False)


def test_the_demo_starts_from_the_sim_base_shared_through_the_cache(tmp_path: Path) -> None:
    assert DemoSettings().model == "sim-base"
    assert sim_base_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "zk0" / "sim-base" / "seed-0"
    assert sim_base_dir({"HOME": "/home/u"}) == Path("/home/u/.cache/zk0/sim-base/seed-0")


def test_agent_config_is_a_valid_federated_sim_host(tmp_path: Path) -> None:
    from zk0.agent.config import parse_config

    template = yaml.safe_load((REPO / "configs" / "agent.yaml").read_text())
    plan = host_plans(DemoSettings(hosts=3))[2]
    raw = agent_config(template, plan, DemoSettings(validation_episodes=6), state_dir=tmp_path / "state",
                       runtime_dir=tmp_path / "run", superlink="127.0.0.1:9092", ca_cert=tmp_path / "ca.pem",
                       private_key=tmp_path / "host3", runtime_port=40001)
    config = parse_config(raw)
    assert config.host_id == "host3" and config.federation.node_name == "host3"
    assert config.federation.runtime_port == 40001 and config.federation.datasets == ["demo"]
    assert config.federation.policy_store == tmp_path / "state" / "policies"
    assert config.validation.episodes == 6 and config.validation.tasks == ["pick_place_red", "push_blue_left"]
    assert config.idle.quiet_time_s == 0 and config.idle.max_load_per_core is None
    assert config.record.reset_time_s == 0 and [c.width for c in config.cameras] == [128, 128]
    assert template["host_id"] == "sim-host-0"  # the template is not changed


def test_server_yaml_carries_the_training_size() -> None:
    from zk0.server.config import parse_server_config

    config = parse_server_config(yaml.safe_load(server_yaml(DemoSettings(local_steps=7, batch_size=3))))
    assert (config.training.local_steps, config.training.batch_size, config.evaluation.max_samples) == (7, 3, 16)
