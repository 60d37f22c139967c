"""`zk0 model tiny|full-random OUT_DIR`: write a random SmolVLM stand-in (tiny, or SmolVLM2-500M's shape);
`zk0 model sim-base OUT_DIR [--seed S]`: build the simulated world's base policy (zk0.learn.sim_base)."""

from __future__ import annotations

import argparse
import json
import sys
import time

KINDS = ("tiny", "full-random", "sim-base")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=KINDS,
                        help="tiny stand-in or SmolVLM2-500M shape (a VLM directory), or sim-base (a pretrained "
                             "SmolVLA checkpoint for the simulated world)")
    parser.add_argument("out_dir", help="directory to write into")
    parser.add_argument("--seed", type=int, default=0,
                        help="sim-base: fixes the initial weights and the training order (default %(default)s)")


class _Progress:
    """The trainer's should_stop: a progress line on stderr every 100 steps, never stops training."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.started = total, 0, time.perf_counter()

    def __call__(self) -> bool:
        if self.done == 0:  # the first step: recording the demonstrations came before, not part of the rate
            self.started = time.perf_counter()
        if self.done % 100 == 0:
            rate = self.done / max(time.perf_counter() - self.started, 1e-9)
            sys.stderr.write(f"\rpretraining {self.done}/{self.total} steps, {rate:.1f} step/s")
            sys.stderr.flush()
        self.done += 1
        return False


def run(args: argparse.Namespace) -> int:
    if args.kind == "sim-base":
        return _sim_base(args)
    from zk0.learn.tiny_vlm import SMOLVLM2_500M, VLMShape, write_tiny_vlm

    out = write_tiny_vlm(args.out_dir, VLMShape() if args.kind == "tiny" else SMOLVLM2_500M)
    print(f"wrote {args.kind} SmolVLM to {out}; use it with --model {out} or "
          f"lerobot-train --policy.vlm_model_name={out} --policy.load_vlm_weights=false")
    return 0


def _sim_base(args: argparse.Namespace) -> int:
    from zk0.learn.sim_base import PRESETS, build_sim_base

    recipe = PRESETS["sim-base"]
    report = build_sim_base(args.out_dir, recipe, args.seed, progress=_Progress(recipe.steps),
                            log=lambda line: print(f"zk0 model sim-base: {line}", file=sys.stderr, flush=True))
    sys.stderr.write("\n")
    print(json.dumps({"checkpoint": str(args.out_dir), "sha256": report.sha256, "seed": args.seed,
                      "demos": report.successful_demos, "frames": report.frames,
                      "record_s": round(report.record_s, 1), "train_s": round(report.train_s, 1),
                      "loss_last_100": sum(report.losses[-100:]) / max(len(report.losses[-100:]), 1),
                      "parameters": report.parameters, "trainable_when_fine_tuned": report.trainable_after}))
    print(f"fine-tune it with: zk0 train --model {args.out_dir} --dataset ROOT --steps N", file=sys.stderr)
    return 0
