"""`zk0 model tiny OUT_DIR`: write the tiny random SmolVLM stand-in (or `full-random`, SmolVLM2-500M's shape)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=["tiny", "full-random"], help="tiny stand-in or SmolVLM2-500M shape")
    parser.add_argument("out_dir", help="directory to write config, tokenizer and processor into")


def run(args: argparse.Namespace) -> int:
    from zk0.learn.tiny_vlm import SMOLVLM2_500M, VLMShape, write_tiny_vlm

    out = write_tiny_vlm(args.out_dir, VLMShape() if args.kind == "tiny" else SMOLVLM2_500M)
    print(f"wrote {args.kind} SmolVLM to {out}; use it with --model {out} or "
          f"lerobot-train --policy.vlm_model_name={out} --policy.load_vlm_weights=false")
    return 0
