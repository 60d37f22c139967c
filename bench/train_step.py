"""zk0's local trainer vs `lerobot-train`, side by side on the same dataset, model config and batch size.

Prints one JSON object:
  throughput: mean seconds per training step, data loading included, for both, and the speedup; zk0 runs two
    rounds of --steps like a federated host (the first decodes episodes into the frame cache; the reported
    speedup is a later round's, first_round_speedup the first's);
  fedprox: median update-step time (forward+backward+optimizer) with mu=0 vs mu>0 on the same batch, overhead;
  memory: peak RSS of each trainer's process, their ratio, and zk0's frame-cache size.
Each trainer runs in its own child process so peak RSS is comparable. Tiny model on CPU unless --model says.

  python bench/train_step.py [--dataset ROOT] [--steps 30] [--batch-size 8] [--model tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WARMUP = 3


def _zk0_child(args: argparse.Namespace) -> dict:
    import torch
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata

    from zk0.learn.data import EpisodeData, policy_image_size
    from zk0.learn.frame_cache import FrameCache
    from zk0.learn.fedprox import proximal_term
    from zk0.learn.policy import PolicySpec, make_policy_bundle, trainable_parameters
    from zk0.learn.trainer import LocalTrainer, TrainerConfig

    meta = LeRobotDatasetMetadata("local/bench", root=args.dataset)
    bundle = make_policy_bundle(PolicySpec(model=args.vlm_dir), meta)
    cache = FrameCache()
    data = EpisodeData(args.dataset, bundle.policy.config.chunk_size, policy_image_size(bundle.policy.config), cache)
    trainer = LocalTrainer(bundle.policy, bundle.preprocessor, data, TrainerConfig(batch_size=args.batch_size))
    def timed_round() -> tuple[list[float], int]:
        marks: list[float] = []
        result = trainer.train(None, args.steps, should_stop=lambda: marks.append(time.perf_counter()) and False)
        marks.append(time.perf_counter())
        return [b - a for a, b in zip(marks, marks[1:])], result.steps_done

    # A host trains round after round on the same episodes: the first round decodes each episode once into
    # the frame cache, later rounds read it. Both are reported.
    cold_steps, _ = timed_round()
    steps, steps_done = timed_round()

    # FedProx overhead on the update step alone: same batch, alternating mu=0 / mu>0
    policy = bundle.policy
    params = trainable_parameters(policy)
    reference = [p.detach().clone() for p in params]
    optimizer = policy.config.get_optimizer_preset().build(params)
    batch = bundle.preprocessor(data.batch(data.frame_index()[: args.batch_size]))
    timings: dict[float, list[float]] = {0.0: [], 0.1: []}
    for _ in range(args.fedprox_repeats):
        for mu in timings:
            start = time.perf_counter()
            loss, _ = policy.forward(dict(batch))
            (loss + proximal_term(params, reference, mu)).backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            timings[mu].append(time.perf_counter() - start)
    return {
        "step_seconds": statistics.mean(steps),
        "cold_step_seconds": statistics.mean(cold_steps[WARMUP:]),
        "first_steps_seconds": cold_steps[:WARMUP],
        "steps_done": steps_done,
        "update_step_seconds_mu0": statistics.median(timings[0.0]),
        "update_step_seconds_mu": statistics.median(timings[0.1]),
        "frame_cache_bytes": cache.size_bytes,
        "trainable_params": sum(p.numel() for p in params),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def _lerobot_train(args: argparse.Namespace, out: Path) -> dict:
    import json as _json

    image_size = _json.loads((Path(args.vlm_dir) / "config.json").read_text())["vision_config"]["image_size"]
    cmd = [
        str(Path(sys.executable).with_name("lerobot-train")), "--policy.type=smolvla",
        f"--policy.vlm_model_name={args.vlm_dir}", "--policy.load_vlm_weights=false", "--policy.push_to_hub=false",
        f"--policy.resize_imgs_with_padding=[{image_size},{image_size}]", "--policy.device=cpu",
        "--dataset.repo_id=local/bench", f"--dataset.root={args.dataset}", f"--steps={args.steps}",
        f"--batch_size={args.batch_size}", "--log_freq=1", "--save_checkpoint=false", "--wandb.enable=false",
        f"--num_workers={args.lerobot_workers}", f"--output_dir={out}",
    ]
    wrapper = ("import resource,subprocess,sys,json;r=subprocess.run(sys.argv[1:],capture_output=True,text=True);"
               "sys.stdout.write(r.stdout+r.stderr);print('RSS',resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, env=os.environ)
    log = proc.stdout
    updt = [float(x) for x in re.findall(r"updt_s:([\d.]+)", log)]
    data = [float(x) for x in re.findall(r"data_s:([\d.]+)", log)]
    if len(updt) < args.steps:
        raise RuntimeError(f"lerobot-train logged {len(updt)} of {args.steps} steps:\n{log[-2000:]}")
    steps = [u + d for u, d in zip(updt, data)]
    rss = int(re.findall(r"^RSS (\d+)$", log, re.M)[-1]) * 1024
    return {"step_seconds": statistics.mean(steps[WARMUP:]), "first_steps_seconds": steps[:WARMUP],
            "data_seconds_mean": statistics.mean(data[WARMUP:]), "peak_rss_bytes": rss}


def _ensure_dataset(args: argparse.Namespace, work: Path) -> None:
    if args.dataset:
        return
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "learn_fixtures", Path(__file__).resolve().parents[1] / "tests" / "learn" / "conftest.py")
    fixtures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixtures)
    args.dataset = str(work / "dataset")
    fixtures.make_dataset(args.dataset, episodes=6, frames=60, height=96, width=128)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", help="LeRobot dataset root (default: a generated SO-101-shaped one)")
    parser.add_argument("--model", default="tiny", choices=["tiny", "full-random"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--fedprox-repeats", type=int, default=15)
    parser.add_argument("--lerobot-workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--vlm-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        print(json.dumps(_zk0_child(args)))
        return 0

    from zk0.learn.tiny_vlm import SMOLVLM2_500M, VLMShape, write_tiny_vlm

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _ensure_dataset(args, work)
        args.vlm_dir = str(write_tiny_vlm(work / "vlm", VLMShape() if args.model == "tiny" else SMOLVLM2_500M))
        child = subprocess.run(
            [sys.executable, __file__, "--child", "--dataset", args.dataset, "--vlm-dir", args.vlm_dir,
             "--steps", str(args.steps), "--batch-size", str(args.batch_size),
             "--fedprox-repeats", str(args.fedprox_repeats)],
            capture_output=True, text=True, check=False)
        if child.returncode:
            raise RuntimeError(child.stderr[-2000:])
        zk0 = json.loads(child.stdout.strip().splitlines()[-1])
        lerobot = _lerobot_train(args, work / "lerobot_out")

    print(json.dumps({
        "model": args.model, "device": "cpu", "steps": args.steps, "batch_size": args.batch_size,
        "dataset": args.dataset,
        "throughput": {"zk0_step_seconds": zk0["step_seconds"], "zk0_first_round_step_seconds": zk0["cold_step_seconds"],
                       "lerobot_step_seconds": lerobot["step_seconds"],
                       "lerobot_data_seconds": lerobot["data_seconds_mean"],
                       "speedup": lerobot["step_seconds"] / zk0["step_seconds"],
                       "first_round_speedup": lerobot["step_seconds"] / zk0["cold_step_seconds"], "target": ">= 1.5"},
        "fedprox": {"update_seconds_mu0": zk0["update_step_seconds_mu0"],
                    "update_seconds_mu": zk0["update_step_seconds_mu"],
                    "overhead": zk0["update_step_seconds_mu"] / zk0["update_step_seconds_mu0"] - 1,
                    "target": "<= 0.05"},
        "memory": {"zk0_peak_rss_bytes": zk0["peak_rss_bytes"], "lerobot_peak_rss_bytes": lerobot["peak_rss_bytes"],
                   "ratio": zk0["peak_rss_bytes"] / lerobot["peak_rss_bytes"], "target": "<= 1.05",
                   "frame_cache_bytes": zk0["frame_cache_bytes"]},
        "trainable_params": zk0["trainable_params"],
    }, indent=None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
