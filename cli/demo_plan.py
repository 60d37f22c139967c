"""What `zk0 demo` runs, decided before anything starts (pure): its size, each host's tasks and recording
sessions, each host's agent config and the server's config.

Hosts take turns at three kinds of work, as a small fleet of real arms would: host 1 picks and places, host 2
pushes, host 3 does both; a fourth host picks again with another colour, and so on. Recording seeds are
disjoint between hosts (`HOST_SEED_STRIDE`), so no two hosts record the same scene.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

PICKS = ("pick_place_red", "pick_place_blue", "pick_place_green")
PUSHES = ("push_blue_left", "push_red_right", "push_green_right", "push_red_left")
HOST_SEED_STRIDE = 10_000  # host i records seeds from i * stride (zk0 validate's seeds start at 1_000_000)
DATASET = "demo"  # each host's dataset name under its own datasets root
SIM_BASE_SEED = 0


@dataclass(frozen=True)
class DemoSettings:
    """The demo's size. The defaults fit this 2-core machine in minutes; `FULL` is the full-size path."""

    hosts: int = 3
    rounds: int = 3
    episodes: int = 4  # recorded per host
    # the sim base (built into the cache on first use, ~8.5 min here) succeeds at all; tiny never does
    model: str = "sim-base"  # sim-base | tiny | a checkpoint directory
    local_steps: int = 20
    batch_size: int = 4
    eval_max_samples: int = 16  # server evaluation samples per round
    validation_episodes: int = 4  # paired episodes per host (each runs both policies)
    # The scripted operator needs ~8.5 s to pick and place, ~7 s to push (lock-step, 30 fps): recorded episodes
    # must hold a whole demonstration, and validation episodes must give a policy as long as it.
    max_episode_s: float = 12.0  # a validation episode not done by then fails
    episode_time_s: float = 11.0  # one recorded episode
    rollout_time_s: float = 5.0  # the one rollout of the promoted policy
    round_timeout_s: float = 900.0

    def __post_init__(self) -> None:
        for name in ("hosts", "rounds", "episodes", "local_steps", "batch_size", "eval_max_samples",
                     "validation_episodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("max_episode_s", "episode_time_s", "rollout_time_s", "round_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")


# The full-size path (--full): the sim base, more data, rounds, steps and validation episodes (an hour or more here).
FULL = DemoSettings(hosts=3, rounds=10, episodes=20, model="sim-base", local_steps=200, batch_size=8,
                    eval_max_samples=64, validation_episodes=20, max_episode_s=20.0, episode_time_s=14.0,
                    rollout_time_s=20.0, round_timeout_s=3600.0)


def settings_from(overrides: Mapping[str, Any], full: bool) -> DemoSettings:
    """The defaults (or `FULL`) with the options the user gave (None: not given)."""
    base = FULL if full else DemoSettings()
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def sim_base_dir(env: Mapping[str, str] = os.environ) -> Path:
    """Where `zk0 model sim-base` is cached, shared with `zk0 experiment` (~/.cache/zk0/sim-base/seed-0)."""
    from zk0.learn.sim_base import cache_dir

    return cache_dir(SIM_BASE_SEED, env)


@dataclass(frozen=True)
class HostPlan:
    """One simulated robot host: its name, its tasks and its recording sessions (task, episodes, first seed)."""

    index: int  # from 0
    name: str
    tasks: tuple[str, ...]
    sessions: tuple[tuple[str, int, int], ...]


def host_tasks(index: int) -> tuple[str, ...]:
    """Host `index`'s task mix: picks, pushes, or both, in turn; colours change every three hosts."""
    pick, push = PICKS[(index // 3) % len(PICKS)], PUSHES[(index // 3) % len(PUSHES)]
    return ((pick,), (push,), (pick, push))[index % 3]


def split_episodes(tasks: Sequence[str], episodes: int) -> list[tuple[str, int]]:
    """`episodes` spread over `tasks` as evenly as they go (earlier tasks get the remainder); tasks that get
    none are left out."""
    share, extra = divmod(episodes, len(tasks))
    counts = [share + (i < extra) for i in range(len(tasks))]
    return [(task, n) for task, n in zip(tasks, counts) if n > 0]


def host_plans(settings: DemoSettings) -> list[HostPlan]:
    plans = []
    for index in range(settings.hosts):
        tasks = host_tasks(index)
        sessions, seed = [], index * HOST_SEED_STRIDE
        for task, n in split_episodes(tasks, settings.episodes):
            sessions.append((task, n, seed))
            seed += n
        plans.append(HostPlan(index, f"host{index + 1}", tasks, tuple(sessions)))
    return plans


def agent_config(template: Mapping[str, Any], plan: HostPlan, settings: DemoSettings, *, state_dir: Path,
                 runtime_dir: Path, superlink: str, ca_cert: Path, private_key: Path,
                 runtime_port: int) -> dict[str, Any]:
    """A host's agent.yaml: the shipped template with this host's dirs, small cameras (the sim base sees
    128x96), no reset pause, the validation size, leases granted as soon as the host is idle, and a federation
    section naming the demo's SuperLink, CA and this host's registered key, and a SuperNode runtime port of its
    own (several SuperNodes on one machine)."""
    config = {key: value for key, value in template.items()}
    config.update(
        host_id=plan.name, datasets_root=str(state_dir / "datasets"),
        control_address=f"ipc://{runtime_dir}/standalone.sock",  # never used: the agent serves <runtime-dir>/agent.sock
        cameras=[{"name": name, "type": "zmq", "width": 128, "height": 96, "fps": 30} for name in ("front", "wrist")],
        record={**template.get("record", {}), "episode_time_s": settings.episode_time_s, "reset_time_s": 0},
        validation={"episodes": settings.validation_episodes, "max_episode_s": settings.max_episode_s,
                    "tasks": list(plan.tasks)},
        # A shared 2-core machine is always "busy": the load and memory guards would refuse every lease.
        idle={"quiet_time_s": 0, "max_load_per_core": None, "min_free_memory_mb": None, "require_ac_power": False},
        federation={"superlink": superlink, "root_certificates": str(ca_cert), "auth_private_key": str(private_key),
                    "datasets": [DATASET], "policy_store": str(state_dir / "policies"), "node_name": plan.name,
                    "runtime_port": runtime_port},
    )
    return config


def server_yaml(settings: DemoSettings) -> str:
    """The server config file: training size, evaluation samples and round timeout (the rest: defaults)."""
    return (f"training: {{local_steps: {settings.local_steps}, batch_size: {settings.batch_size}, "
            f"eval_fraction: 0.25}}\n"
            f"evaluation: {{max_samples: {settings.eval_max_samples}}}\n"
            f"nodes: {{round_timeout_s: {settings.round_timeout_s}}}\n")
