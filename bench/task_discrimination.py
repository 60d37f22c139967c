"""How well each simulated task tells a policy that looks from one that does not: success of the scripted
operator, of an untrained tiny policy and of an open-loop replay of the mean demonstration.

A task is discriminative when the two blind controllers (untrained: random weights; mean replay: the
average of M scripted demonstrations per tick, ignoring the scene) succeed in at most 5% of episodes while
the scripted operator succeeds in at least 90%. Every episode runs in lock-step (zk0.agent.lockstep) inside
the default safety envelope, as `zk0 validate --sim` runs them, for at most `--max-episode-s`.

Seeds: demonstrations use 0.. (as `zk0 record --sim` does); judged episodes use `SEED_BASE + i`, disjoint
from recording (below a million) and from validation (`VALIDATION_SEED_BASE`, 1_000_000 + i). Cameras are
rendered at 64x48: the tiny policy resizes every image to its 64x64 input anyway, and full-size frames
would triple the run time without changing what a random network does.

Prints one JSON object: per task and controller, zk0.agent.validate.summarize (successes, Wilson 95%
interval, time to success, envelope interventions, table contacts).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np

from zk0.agent.lockstep import EpisodeOutcome, PolicyController, run_episode
from zk0.agent.validate import summarize
from zk0.hw.config import SafetySettings
from zk0.hw.safety import SafetyEnvelope, envelope_spec
from zk0.hw.sim.calibration import MOTOR_NAMES
from zk0.hw.sim.lockstep import LockstepSim, Observation, OperatorController, follower_limits
from zk0.hw.sim.tasks import TASKS, Task

SEED_BASE = 2_000_000
FPS = 30
CAMERAS = {"front": (64, 48), "wrist": (64, 48)}
ROBOT = "so101"
ARMS = ("scripted", "untrained", "mean_replay")
TARGET_BLIND = 0.05  # at most this success rate for either blind controller
TARGET_SCRIPTED = 0.90


class Recorder:
    """Wraps a controller and keeps every target it asked for, and the present joints it saw."""

    def __init__(self, controller: Any) -> None:
        self.controller = controller
        self.actions: list[np.ndarray] = []
        self.states: list[np.ndarray] = []

    def reset(self, task: Task, seed: int) -> None:
        self.actions, self.states = [], []
        self.controller.reset(task, seed)

    def act(self, observation: Observation) -> np.ndarray:
        action = np.asarray(self.controller.act(observation), dtype=np.float64)
        self.actions.append(action)
        self.states.append(observation.joints.copy())
        return action


class Replay:
    """Open loop: the same joint trajectory whatever it sees, holding its last target once it runs out."""

    def __init__(self, trajectory: np.ndarray) -> None:
        self.trajectory = trajectory
        self.tick = 0

    def reset(self, task: Task, seed: int) -> None:
        self.tick = 0

    def act(self, observation: Observation) -> np.ndarray:
        target = self.trajectory[min(self.tick, len(self.trajectory) - 1)]
        self.tick += 1
        return target


def mean_trajectory(trajectories: Sequence[np.ndarray]) -> np.ndarray:
    """Per-tick mean of (ticks, joints) trajectories of different lengths, each padded with its last row
    (a finished demonstration holds its final pose)."""
    if not trajectories:
        raise ValueError("no trajectories to average")
    length = max(len(t) for t in trajectories)
    padded = [np.concatenate([t, np.repeat(t[-1:], length - len(t), axis=0)]) for t in trajectories]
    return np.mean(padded, axis=0)


def joint_stats(frames: np.ndarray) -> dict[str, np.ndarray]:
    """What lerobot's normalizer reads for a (frames, joints) feature."""
    return {"mean": frames.mean(axis=0), "std": frames.std(axis=0), "min": frames.min(axis=0),
            "max": frames.max(axis=0), "count": np.array([len(frames)])}


def dataset_meta(states: np.ndarray, actions: np.ndarray) -> SimpleNamespace:
    """The part of a LeRobot dataset's metadata a policy is built from: features (the sim's joints and
    cameras) and the demonstrations' state/action statistics, as `zk0 train` would see them at step 0."""
    names = [f"{name}.pos" for name in MOTOR_NAMES]
    features: dict[str, Any] = {key: {"dtype": "float32", "shape": (len(names),), "names": names}
                                for key in ("observation.state", "action")}
    for camera, (width, height) in CAMERAS.items():
        features[f"observation.images.{camera}"] = {"dtype": "video", "shape": (height, width, 3),
                                                    "names": ["height", "width", "channels"]}
    return SimpleNamespace(features=features, stats={"observation.state": joint_stats(states),
                                                     "action": joint_stats(actions)})


def untrained_controller(meta: SimpleNamespace, seed: int) -> PolicyController:
    """The tiny SmolVLA `zk0 train --model tiny` starts from (weights fixed by `seed`), never trained."""
    from zk0.learn.federation import policy_spec
    from zk0.learn.policy import seeded_policy_bundle

    with contextlib.redirect_stdout(sys.stderr):  # lerobot prints while building; stdout is the JSON
        bundle = seeded_policy_bundle(policy_spec("tiny", "cpu"), meta, seed)
    bundle.policy.eval()
    return PolicyController(bundle, f"{ROBOT}_follower")


def run_arm(sim: LockstepSim, controller: Any, spec: Any, task: str, seeds: Sequence[int],
            max_ticks: int) -> list[EpisodeOutcome]:
    return [run_episode(sim, controller, SafetyEnvelope(spec), task, seed, max_ticks) for seed in seeds]


def discriminate(task: str, episodes: int, demos: int, max_episode_s: float, policy_seed: int,
                 arms: Sequence[str] = ARMS) -> dict[str, Any]:
    """The controllers `arms` on `episodes` judged seeds of `task`, and the demonstrations behind the blind ones."""
    spec = envelope_spec(follower_limits(), SafetySettings(), FPS, ROBOT)
    max_ticks = int(round(max_episode_s * FPS))
    blind_sim, seeing_sim = LockstepSim({}, FPS, ROBOT), LockstepSim(CAMERAS, FPS, ROBOT)
    recorder = Recorder(OperatorController(blind_sim))
    actions, states, demo_successes = [], [], 0
    for seed in range(demos):
        demo_successes += run_episode(blind_sim, recorder, SafetyEnvelope(spec), task, seed, max_ticks).success
        actions.append(np.array(recorder.actions))
        states.append(np.array(recorder.states))
    seeds = [SEED_BASE + i for i in range(episodes)]
    meta = dataset_meta(np.concatenate(states), np.concatenate(actions))
    controllers = {"scripted": lambda: (blind_sim, OperatorController(blind_sim)),
                   "untrained": lambda: (seeing_sim, untrained_controller(meta, policy_seed)),
                   "mean_replay": lambda: (blind_sim, Replay(mean_trajectory(actions)))}
    result: dict[str, Any] = {"demonstrations": {"episodes": demos, "successes": demo_successes}}
    for arm in arms:
        sim, controller = controllers[arm]()
        started = time.monotonic()
        result[arm] = summarize(run_arm(sim, controller, spec, task, seeds, max_ticks))
        result[arm]["elapsed_s"] = round(time.monotonic() - started, 1)
    return result


def verdict(result: dict[str, Any]) -> bool | None:
    """Discriminative: both blind controllers at or below `TARGET_BLIND`, the operator at or above
    `TARGET_SCRIPTED` (point estimates); None when an arm did not run."""
    if any(arm not in result for arm in ARMS):
        return None
    blind = max(result["untrained"]["success_rate"], result["mean_replay"]["success_rate"])
    return blind <= TARGET_BLIND and result["scripted"]["success_rate"] >= TARGET_SCRIPTED


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=100, help="judged episodes per task and controller")
    parser.add_argument("--demos", type=int, default=30, help="scripted demonstrations averaged per task")
    parser.add_argument("--task", action="append", choices=sorted(TASKS), help="repeatable (default: all)")
    parser.add_argument("--max-episode-s", type=float, default=20.0, help="validation's default episode limit")
    parser.add_argument("--policy-seed", type=int, default=0, help="seed of the untrained policy's weights")
    parser.add_argument("--arm", action="append", choices=ARMS, help="controllers to run, repeatable (default: all)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 episodes, 3 demos, 4 s episodes")
    args = parser.parse_args(argv)
    if args.quick:
        args.episodes, args.demos, args.max_episode_s = 3, 3, 4.0
    import torch

    torch.set_num_threads(1)  # a tiny model: threads cost more than they give, and the machine is shared
    started = time.monotonic()
    tasks = {}
    for task in args.task or list(TASKS):
        task_started = time.monotonic()
        tasks[task] = discriminate(task, args.episodes, args.demos, args.max_episode_s, args.policy_seed,
                                   args.arm or ARMS)
        tasks[task]["discriminative"] = verdict(tasks[task])
        tasks[task]["elapsed_s"] = round(time.monotonic() - task_started, 1)
        print(f"{task}: " + ", ".join(f"{arm} {tasks[task][arm]['successes']}/{args.episodes}"
                                      for arm in args.arm or ARMS), file=sys.stderr)
    print(json.dumps({
        "bench": "task_discrimination",
        "settings": {"episodes": args.episodes, "demos": args.demos, "max_episode_s": args.max_episode_s,
                     "fps": FPS, "cameras": CAMERAS, "seeds": f"{SEED_BASE} + i", "demo_seeds": "0 + i",
                     "policy_seed": args.policy_seed, "safety": "SafetySettings() defaults",
                     "targets": {"blind_at_most": TARGET_BLIND, "scripted_at_least": TARGET_SCRIPTED}},
        "tasks": tasks,
        "all_discriminative": all(t["discriminative"] for t in tasks.values()) if not args.arm else None,
        "elapsed_s": round(time.monotonic() - started, 1),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
