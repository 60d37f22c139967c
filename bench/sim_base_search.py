"""Which sim-base configuration learns on this CPU: build a base, judge it per task, fine-tune it as a host
would and judge that, for each configuration asked for.

Per configuration (`--config NAME[:knob=value,...]`, knobs of zk0.learn.sim_base's recipe, shape or VLM):
1. build the base with `zk0.learn.sim_base.build_sim_base` (scripted demonstrations of every task, scene
   seeds from 3_000_000; everything trained, then the VLM frozen);
2. the base closed-loop on `--base-episodes` validation seeds per task (1_000_000 + i, as `zk0 validate`);
3. per `--host-task`: `--host-demos` scripted demonstrations with recording seeds 0.. (as `zk0 record --sim`
   gives a host), the base fine-tuned on them along the path `zk0 train --model BASE` takes (policy spec of
   a model given by path, the host's own normalization, VLM frozen, only the action expert trains) for
   `--host-steps` steps, then judged on `--episodes` validation seeds of that task.
Episodes run in lock-step through the default safety envelope (zk0.agent.lockstep, as `zk0 validate --sim`).
Host demonstrations are rendered in lock-step, not recorded through the rig and AV1: the only difference is
the codec's loss.

Prints one JSON object: per configuration the recipe, build times and loss, per-task success with Wilson 95%
intervals, seconds per validation episode, fine-tuning times. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from zk0.learn import sim_base, sim_demos

ROBOT = "so101"


def parse_config(text: str) -> tuple[str, dict[str, Any]]:
    """`name:knob=value,knob=value` -> (name, knobs); values are Python literals (ints, floats, tuples)."""
    import ast

    name, _, rest = text.partition(":")
    knobs = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        knobs[key.strip()] = ast.literal_eval(value.strip())
    return name, knobs


def judge(bundle: Any, task: str, episodes: int, max_episode_s: float) -> dict[str, Any]:
    """Closed-loop success of `bundle` on the first `episodes` validation seeds of `task`."""
    from zk0.agent.lockstep import policy_in_sim, run_episode
    from zk0.agent.validate import episode_plan, summarize
    from zk0.hw.config import SafetySettings
    from zk0.hw.safety import SafetyEnvelope, envelope_spec
    from zk0.hw.sim.lockstep import follower_limits

    spec = envelope_spec(follower_limits(), SafetySettings(), sim_demos.FPS, ROBOT)
    sim, controller = policy_in_sim(bundle, sim_demos.FPS, ROBOT)
    started = time.perf_counter()
    outcomes = [run_episode(sim, controller, SafetyEnvelope(spec), t, seed, int(round(max_episode_s * sim_demos.FPS)))
                for t, seed in episode_plan([task], episodes)]
    summary = summarize(outcomes)
    summary["seconds_per_episode"] = round((time.perf_counter() - started) / episodes, 3)
    summary["seconds_per_tick_ms"] = round(1000 * (time.perf_counter() - started) / sum(o.ticks for o in outcomes), 3)
    return summary


def finetune(base: Path, demos: Sequence[sim_demos.Demo], cameras: dict[str, tuple[int, int]], steps: int,
             batch_size: int, lr: float | None, seed: int, base_stats: bool = False) -> tuple[Any, dict[str, Any]]:
    """The base fine-tuned on a host's demonstrations the way `zk0 train --model BASE` does it: normalized
    with the host's own statistics, or with `base_stats` the ones the base was pretrained with."""
    from zk0.learn.checkpoint import STATS_FILE
    from zk0.learn.federation import policy_spec
    from zk0.learn.policy import seeded_policy_bundle, trainable_names
    from zk0.learn.stats import to_lerobot_stats
    from zk0.learn.sufficient_stats import SufficientStats
    from zk0.learn.trainer import LocalTrainer, TrainerConfig

    meta, stats = sim_demos.demo_meta(demos, cameras)
    if base_stats:
        with np.load(base / STATS_FILE) as record:
            stats = SufficientStats.from_record(dict(record))
    with contextlib.redirect_stdout(sys.stderr):
        bundle = seeded_policy_bundle(policy_spec(str(base), "cpu"), meta, seed, stats=to_lerobot_stats(stats))
    trainable = trainable_names(bundle.policy)
    if any(".vlm." in name for name in trainable):
        raise AssertionError("fine-tuning would train the VLM")
    data = sim_demos.DemoData(demos, bundle.policy.config.chunk_size)
    result = LocalTrainer(bundle.policy, bundle.preprocessor, data,
                          TrainerConfig(batch_size=batch_size, seed=seed)).train(None, steps, lr=lr)
    bundle.policy.eval()
    losses = result.losses
    return bundle, {"steps": steps, "seconds": round(result.seconds, 1), "trainable_parameters":
                    sum(p.numel() for p in bundle.policy.parameters() if p.requires_grad),
                    "loss_first_100": _mean(losses[:100]), "loss_last_100": _mean(losses[-100:])}


class _StepLog:
    """A trainer's should_stop that logs every `every` steps and never stops."""

    def __init__(self, log, every: int) -> None:
        self.log, self.every, self.steps, self.started = log, every, 0, time.perf_counter()

    def __call__(self) -> bool:
        if self.steps and self.steps % self.every == 0:
            self.log(f"step {self.steps}, {(time.perf_counter() - self.started) / self.steps:.3f} s/step")
        self.steps += 1
        return False


def _mean(values: Sequence[float]) -> float | None:
    return round(statistics.fmean(values), 4) if values else None


def demo_cache(args: argparse.Namespace, recipe: sim_base.SimBaseRecipe) -> Path:
    """Where the demonstrations of `recipe` are kept between configurations (and bench runs) sharing them."""
    key = (sim_base.demo_plan(recipe), recipe.shape.cameras, recipe.max_episode_s, recipe.image_stride)
    return args.out / f"demos-{hashlib.sha256(repr(key).encode()).hexdigest()[:12]}.npz"


def save_demos(path: Path, demos: Sequence[sim_demos.Demo]) -> None:
    arrays: dict[str, Any] = {}
    for k, d in enumerate(demos):
        arrays.update({f"{k}/state": d.state, f"{k}/action": d.action, f"{k}/scene": d.scene,
                       f"{k}/meta": np.array([d.task, str(d.seed), str(int(d.success)), str(d.image_stride)])})
        arrays.update({f"{k}/image/{camera}": frames for camera, frames in d.images.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_demos(path: Path) -> list[sim_demos.Demo]:
    with np.load(path) as data:
        count = 1 + max(int(key.split("/")[0]) for key in data.files)
        demos = []
        for k in range(count):
            task, seed, success, stride = data[f"{k}/meta"].tolist()
            images = {key.split("/")[2]: data[key] for key in data.files if key.startswith(f"{k}/image/")}
            demos.append(sim_demos.Demo(task, int(seed), data[f"{k}/state"], data[f"{k}/action"], images,
                                       success == "1", data[f"{k}/scene"], int(stride)))
    return demos


def recipe_demos(args: argparse.Namespace, recipe: sim_base.SimBaseRecipe, log) -> list[sim_demos.Demo]:
    path = demo_cache(args, recipe)
    if path.is_file():
        log(f"demonstrations from {path}")
        return load_demos(path)
    log(f"recording {recipe.demos_per_task} demonstrations per task")
    demos = sim_demos.record_demos(sim_base.demo_plan(recipe), recipe.shape.camera_sizes(), recipe.max_episode_s,
                                  recipe.image_stride)
    save_demos(path, demos)
    return demos


def build(recipe: sim_base.SimBaseRecipe, base_dir: Path, args: argparse.Namespace, log) -> dict[str, Any]:
    """Build the base of `recipe` at `base_dir`; what it took."""
    started = time.perf_counter()
    demos = recipe_demos(args, recipe, log)
    demos_s = time.perf_counter() - started
    report = sim_base.build_sim_base(base_dir, recipe, args.seed, log=log, demos=demos, progress=_StepLog(log, 500))
    log(f"built in {demos_s + report.train_s:.0f} s (loss {_mean(report.losses[:100])} -> "
        f"{_mean(report.losses[-100:])}, scene {_mean(report.scene_losses[:100])} -> "
        f"{_mean(report.scene_losses[-100:])})")
    return {"demos": report.demos, "successful_demos": report.successful_demos, "frames": report.frames,
            "record_s": round(demos_s, 1), "train_s": round(report.train_s, 1),
            "loss_first_100": _mean(report.losses[:100]), "loss_last_100": _mean(report.losses[-100:]),
            "scene_loss_first_100": _mean(report.scene_losses[:100]),
            "scene_loss_last_100": _mean(report.scene_losses[-100:]),
            "parameters": report.parameters, "trainable_after": report.trainable_after}


def run_config(name: str, knobs: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    from zk0.learn.checkpoint import load_checkpoint

    recipe = sim_base.with_knobs(sim_base.PRESETS["sim-base"], **knobs)
    out = args.out / name
    log = lambda line: print(f"[{name}] {line}", file=sys.stderr, flush=True)  # noqa: E731
    result: dict[str, Any] = {"knobs": knobs, "recipe": sim_base.describe(recipe)}
    base_dir = args.base_dir or out / "base"
    if args.base_dir is None:
        result["build"] = build(recipe, base_dir, args, log)
    with contextlib.redirect_stdout(sys.stderr):
        base, _ = load_checkpoint(base_dir)
    result["base_checkpoint"] = str(base_dir)
    base.policy.eval()
    result["base"] = {}
    for task in (args.base_task or sim_base.task_names(recipe)) if args.base_episodes else ():
        result["base"][task] = judge(base, task, args.base_episodes, args.max_episode_s)
        log(f"base {task}: {result['base'][task]['successes']}/{args.base_episodes}")
    result["hosts"] = {}
    cameras = recipe.shape.camera_sizes()
    for task in args.host_task:
        started = time.perf_counter()
        demos = sim_demos.record_demos([(task, seed) for seed in range(args.host_demos)], cameras, recipe.max_episode_s)
        record_s = time.perf_counter() - started
        for steps in args.host_steps:
            tuned, info = finetune(base_dir, demos, cameras, steps, args.batch_size, args.lr, args.seed,
                                   args.base_stats)
            info["record_s"] = round(record_s, 1)
            info["demos"] = len(demos)
            info["success"] = judge(tuned, task, args.episodes, args.max_episode_s)
            log(f"host {task} {steps} steps ({info['seconds']} s): {info['success']['successes']}/{args.episodes}")
            result["hosts"].setdefault(task, {})[str(steps)] = info
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", default=[], metavar="NAME[:k=v,...]",
                        help="a configuration: the sim-base preset with these knobs (repeatable; default: the preset)")
    parser.add_argument("--out", type=Path, default=Path("outputs/sim_base_search"),
                        help="where the bases go (one folder per configuration; default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-dir", type=Path, help="judge and fine-tune this base instead of building one "
                                                     "(one --config: the recipe it was built with)")
    parser.add_argument("--base-episodes", type=int, default=20, help="validation episodes per task for the base")
    parser.add_argument("--base-task", action="append", help="judge the base on these tasks only (default: all)")
    parser.add_argument("--host-task", action="append", default=[], help="a host's task (repeatable)")
    parser.add_argument("--host-demos", type=int, default=30)
    parser.add_argument("--host-steps", type=int, action="append", help="fine-tuning steps (repeatable)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=None, help="constant fine-tuning LR (default: the base's schedule)")
    parser.add_argument("--base-stats", action="store_true",
                        help="fine-tune with the base's normalization statistics instead of the host's")
    parser.add_argument("--episodes", type=int, default=50, help="validation episodes per host task")
    parser.add_argument("--max-episode-s", type=float, default=20.0)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 demo per task, 20 steps, 1 episode")
    args = parser.parse_args(argv)
    args.host_steps = args.host_steps or [3000]
    configs = [parse_config(c) for c in args.config] or [("sim-base", {})]
    if args.quick:
        configs = [(n, {**k, "demos_per_task": 1, "steps": 20}) for n, k in configs]
        args.base_episodes, args.episodes, args.host_demos, args.host_steps = 1, 1, 2, [20]
        args.max_episode_s = 2.0
    import torch

    torch.set_num_threads(1)  # small models: threads cost more than they give, and the machine is shared
    started = time.monotonic()
    results = {name: run_config(name, knobs, args) for name, knobs in configs}
    print(json.dumps({"bench": "sim_base_search", "settings": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "config"},
        "configs": results, "elapsed_s": round(time.monotonic() - started, 1)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
