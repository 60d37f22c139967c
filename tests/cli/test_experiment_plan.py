"""The fl-vs-central experiment's pure decisions: task mixes, seeds, step budgets, arms, server settings."""

from __future__ import annotations

from dataclasses import replace

import pytest

from zk0.cli import experiment_plan as plan
from zk0.server.config import parse_server_config
from zk0.server.schedule import ScheduleConfig, ScheduleState, schedule_round


def test_validation_seed_base_is_validates():
    from zk0.agent.validate import VALIDATION_SEED_BASE

    assert plan.VALIDATION_SEED_BASE == VALIDATION_SEED_BASE


@pytest.mark.parametrize("preset", [plan.full, plan.quick])
def test_presets_pass_their_own_checks(preset):
    config = preset()
    plan.check(config)
    assert len(config.hosts) >= 3
    assert config.unseen_tasks and not set(config.unseen_tasks) & set(config.host_tasks)


def test_default_hosts_are_non_iid():
    picker, pusher, mixed = plan.default_hosts()
    assert picker.tasks == ("pick_place_red",) and pusher.tasks == ("push_blue_left",)
    assert set(mixed.tasks) == set(picker.tasks) | set(pusher.tasks)


def test_full_run_judges_at_least_50_episodes_per_task():
    assert plan.full().eval_episodes >= 50


@pytest.mark.parametrize("episodes, tasks, expected", [
    (4, ("a",), {"a": 4}), (4, ("a", "b"), {"a": 2, "b": 2}), (5, ("a", "b"), {"a": 3, "b": 2}),
    (7, ("a", "b", "c"), {"a": 3, "b": 2, "c": 2}),
])
def test_episodes_split_evenly_over_a_hosts_tasks(episodes, tasks, expected):
    assert plan.HostPlan("h", tasks, 0).episodes_per_task(episodes) == expected


def test_equal_total_steps():
    config = plan.full()
    assert config.total_steps == config.rounds * config.local_steps * len(config.hosts) == 3000
    assert config.local_steps_per_host * len(config.hosts) == config.total_steps


def test_recording_seeds_are_disjoint_and_below_validation():
    config = plan.full()
    ranges = [plan.seed_range(h, config.episodes_per_host) for h in config.hosts]
    assert ranges == [(500_000, 500_024), (510_000, 510_024), (520_000, 520_024)]
    assert all(end <= plan.VALIDATION_SEED_BASE for _, end in ranges)


@pytest.mark.parametrize("change, message", [
    ({"unseen_tasks": ()}, "at least one task no host records"),
    ({"unseen_tasks": ("pick_place_red",)}, "unseen task is recorded"),
    ({"episodes_per_host": 20_000}, "overlap"),
    ({"eval_episodes": 0}, "judged episodes"),
])
def test_check_refuses_broken_plans(change, message):
    with pytest.raises(ValueError, match=message):
        plan.check(replace(plan.full(), **change))


def test_check_refuses_seeds_reaching_validation():
    config = plan.full()
    hosts = (*config.hosts[:2], replace(config.hosts[2], first_seed=plan.VALIDATION_SEED_BASE - 5))
    with pytest.raises(ValueError, match="recording seeds must stay"):
        plan.check(replace(config, hosts=hosts))


def test_every_arm_is_judged_on_every_task():
    config = plan.quick()
    names = [a.name for a in plan.arms(config)]
    assert names == ["base", "central", "fedavg", "fedprox", "local-picker", "local-pusher", "local-mixed"]
    assert all(a.tasks == config.tasks for a in plan.arms(config))
    assert {a.host for a in plan.arms(config) if a.kind == "local"} == {"picker", "pusher", "mixed"}


@pytest.mark.parametrize("rounds, points, expected", [
    (20, 3, [5, 10, 15]), (10, 3, [2, 5, 8]), (3, 1, [2]), (1, 3, []), (4, 0, []), (4, 5, [1, 2, 3]),
])
def test_progress_rounds(rounds, points, expected):
    assert plan.progress_rounds(rounds, points) == expected


def test_fedavg_scheduler_is_constant_lr_and_zero_mu():
    cfg = ScheduleConfig(**plan.fedavg_scheduler(1e-4))
    losses: list[float] = []
    state = ScheduleState()
    for server_round, loss in enumerate([2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 3.0, 4.0, 1.0, 1.0], start=1):
        decision = schedule_round(server_round, losses, state, cfg)
        assert decision.lr == pytest.approx(1e-4) and decision.mu == 0.0
        losses.append(loss)
        state = decision.state


@pytest.mark.parametrize("kind", plan.FEDERATED)
def test_server_settings_build_a_valid_server_config(kind):
    config = plan.quick()
    settings = plan.server_settings(kind, config, "/base", ["/d/a", "/d/b", "/d/c"], "/run")
    server = parse_server_config(settings)
    assert server.training.rounds == config.rounds and server.training.local_steps == config.local_steps
    assert server.nodes.min_nodes == 3 and server.evaluation.datasets == ["/d/a", "/d/b", "/d/c"]
    if kind == plan.FEDPROX:
        assert server.scheduler == ScheduleConfig()  # the shipped schedule
    else:
        assert server.scheduler.base_mu == 0.0 and server.scheduler.eta_min == server.scheduler.base_lr


def test_server_settings_refuse_other_arms():
    with pytest.raises(ValueError):
        plan.server_settings("central", plan.quick(), "/b", [], "/r")


def test_a_hosts_sessions_follow_one_another_in_its_seed_range():
    picker, _, mixed = plan.default_hosts()
    assert plan.session_seed(picker, "pick_place_red", 24) == 500_000
    assert plan.session_seed(mixed, "pick_place_red", 24) == 520_000
    assert plan.session_seed(mixed, "push_blue_left", 24) == 520_012
    assert plan.session_seed(mixed, "push_blue_left", 5) == 520_003  # the first task takes the odd episode
