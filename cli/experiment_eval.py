"""Success of the experiment's policies, measured the way `zk0 validate --sim` measures it.

Every policy runs the same seeded episodes in the lock-step simulation, inside the default safety envelope:
zk0.agent.validate's episode plan (tasks in turn, seeds from VALIDATION_SEED_BASE, which no host recorded),
zk0.agent.validate_cli's episode loop (one progress line per episode index, each judging process's policies'
outcomes on it) and
zk0.agent.validate's summaries (successes, Wilson 95 % interval, time to success, envelope interventions, table
contacts). Nothing here reads a clock inside an episode, so machine load changes only how long judging takes.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROBOT = "so101"


def judge(policies: Mapping[str, Path], tasks: Sequence[str], episodes_per_task: int, fps: int,
          max_episode_s: float, processes: int = 2) -> dict[str, dict[str, Any]]:
    """Per policy name: {"all": summary, "per_task": {task: summary}} over `episodes_per_task` episodes of each
    task (zk0.agent.validate.summarize), every policy on the same (task, seed) episodes.

    The policies are shared out over `processes` processes (one torch thread each): an episode is a function of
    (task, seed, policy), so who runs it changes only how long judging takes."""
    names = list(policies)
    groups = [names[i::processes] for i in range(processes) if names[i::processes]]
    args = [({n: policies[n] for n in group}, list(tasks), episodes_per_task, fps, max_episode_s) for group in groups]
    if len(groups) == 1:
        return _judge_here(*args[0])
    # spawned, not forked: this process may hold torch's and Ray's threads
    with ProcessPoolExecutor(len(groups), mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(_judge_here, *zip(*args)))
    return {name: summary for result in results for name, summary in result.items()}


def _judge_here(policies: Mapping[str, Path], tasks: list[str], episodes_per_task: int, fps: int,
                max_episode_s: float) -> dict[str, dict[str, Any]]:
    import torch

    from zk0.agent.lockstep import policy_in_sim
    from zk0.agent.validate import summaries
    from zk0.agent.validate_cli import Setup, sim_outcomes
    from zk0.hw.config import SafetySettings
    from zk0.learn.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    setup = Setup(robot=ROBOT, fps=fps, episodes=episodes_per_task * len(tasks), tasks=tasks, margin=0.0,
                  max_episode_s=max_episode_s, safety=SafetySettings(), store=None, config_path=None,
                  host="experiment", simulated=True)
    runners = {name: policy_in_sim(load_checkpoint(path)[0], fps, ROBOT) for name, path in policies.items()}
    return summaries(sim_outcomes(setup, runners), tasks)
