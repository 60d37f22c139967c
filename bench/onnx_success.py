"""Does an ONNX export succeed as often as the torch policy it came from? Paired simulated episodes.

For a checkpoint (`--checkpoint DIR`; default the sim base `zk0 model sim-base` caches), each backend named by
`--backend` (torch, onnxruntime-fp32, onnxruntime-int8: the export `zk0 policy export-onnx` makes, cached as the
onnxruntime rollout backend caches it) runs the same `--episodes` validation episodes per `--task` in lock-step
through the default safety envelope, exactly as `zk0 validate --sim` runs them (seeds 1_000_000 + i, the same
flow-matching noise per episode). Success is each backend's own; pairs show where two backends part ways.

Prints one JSON object: per backend successes, episodes, rate and Wilson 95 % interval, per task; per ONNX
backend its difference from torch in percentage points and the pairs where exactly one of the two succeeded.

  python bench/onnx_success.py --checkpoint DIR --task pick_place_red --episodes 50
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BACKENDS = {"torch": ("torch", "none"), "onnxruntime-fp32": ("onnxruntime", "none"),
            "onnxruntime-int8": ("onnxruntime", "int8")}
FPS, ROBOT = 30, "so101"


def load(checkpoint: Path, name: str, steps: int | None) -> Any:
    from zk0.learn.onnx_export import ExportOptions
    from zk0.learn.onnx_runtime import load_backend

    backend, quantize = BACKENDS[name]
    with contextlib.redirect_stdout(sys.stderr):
        bundle, _ = load_backend(checkpoint, "cpu", backend, ExportOptions(steps, quantize))
    return bundle


def run(checkpoint: Path, backends: Sequence[str], tasks: Sequence[str], episodes: int, max_episode_s: float,
        steps: int | None) -> dict[str, Any]:
    """Outcomes per backend of the same paired episodes (`episodes` per task), with their summaries."""
    from zk0.agent.lockstep import policy_in_sim
    from zk0.agent.validate import summaries
    from zk0.agent.validate_cli import Setup, sim_outcomes
    from zk0.hw.config import SafetySettings

    setup = Setup(robot=ROBOT, fps=FPS, episodes=episodes * len(tasks), tasks=list(tasks), margin=0.0,
                  max_episode_s=max_episode_s, safety=SafetySettings(), store=None, config_path=None,
                  host="bench", simulated=True)
    runners = {name: policy_in_sim(load(checkpoint, name, steps), FPS, ROBOT) for name in backends}
    with contextlib.redirect_stdout(sys.stderr):  # its progress line per pair; stdout is the JSON report
        outcomes = sim_outcomes(setup, runners)
    result: dict[str, Any] = {name: summaries({name: runs}, tasks)[name] for name, runs in outcomes.items()}
    if "torch" in outcomes:
        reference = [o.success for o in outcomes["torch"]]
        for name in backends:
            if name == "torch":
                continue
            mine = [o.success for o in outcomes[name]]
            result[name]["vs_torch"] = {
                "points": round(100 * (sum(mine) - sum(reference)) / len(mine), 1),
                "only_this_succeeded": sum(m and not r for m, r in zip(mine, reference)),
                "only_torch_succeeded": sum(r and not m for m, r in zip(mine, reference)),
            }
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a lerobot checkpoint folder (default: the cached sim base)")
    parser.add_argument("--backend", action="append", choices=sorted(BACKENDS),
                        help="repeatable (default: torch and onnxruntime-int8)")
    parser.add_argument("--task", action="append",
                        help="simulated task (repeatable; default pick_place_red and push_blue_left)")
    parser.add_argument("--episodes", type=int, default=50, help="paired episodes per task (default 50)")
    parser.add_argument("--max-episode-s", type=float, default=12.0)
    parser.add_argument("--steps", type=int, help="denoising steps of the ONNX backends (default: the checkpoint's)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args(argv)
    if args.episodes < 1:
        parser.error("--episodes must be at least 1")
    if args.checkpoint is None:
        from zk0.learn.sim_base import cache_dir, is_current

        args.checkpoint = cache_dir(0)
        if not is_current(args.checkpoint):
            parser.error(f"no current sim base at {args.checkpoint}: build it with "
                         f"`zk0 model sim-base {args.checkpoint}` or pass --checkpoint")
    if not (args.checkpoint / "config.json").is_file():
        parser.error(f"{args.checkpoint} is not a checkpoint folder (no config.json)")
    args.task = args.task or ["pick_place_red", "push_blue_left"]
    import torch

    torch.set_num_threads(args.threads)
    backends = args.backend or ["torch", "onnxruntime-int8"]
    started = time.perf_counter()
    result = run(args.checkpoint, backends, args.task, args.episodes, args.max_episode_s, args.steps)
    print(json.dumps({"bench": "onnx_success", "checkpoint": str(args.checkpoint), "tasks": args.task,
                      "episodes_per_task": args.episodes, "onnx_steps": args.steps, "backends": result,
                      "wall_s": round(time.perf_counter() - started, 1)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
