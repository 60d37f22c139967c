"""`zk0 train`: centralized SmolVLA training on local LeRobot datasets, the baseline for federated runs.

Writes to --out: metrics.json (per-step loss, held-out losses per dataset and composite, timings),
loss.png, and checkpoint/ (policy + processors normalizing with the datasets' combined statistics).
--seed fixes the initial weights and the order of the training samples, so two runs with the same seed on
the same machine start from the same held-out loss and end with the same weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", action="append", required=True, metavar="ROOT",
                        help="local LeRobot v3 dataset root (repeat for several)")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--model", default="base", help="base | tiny | full-random | PATH (default: base)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="fixes the initial weights and the training order")
    parser.add_argument("--lr", type=float, default=None, help="constant LR (default: SmolVLA warmup+cosine)")
    parser.add_argument("--eval-fraction", type=float, default=0.2, help="episodes held out per dataset")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")


def _cuda() -> bool:
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def plot_losses(losses: list[float], path: Path) -> Figure:
    """The training loss per step, with its moving average (the per-batch loss is noisy), as a PNG."""
    import numpy as np

    from zk0.learn.plots import line_chart

    values = np.asarray(losses, dtype=float)
    window = max(1, min(50, len(values) // 10))
    smoothed = np.convolve(values, np.ones(window) / window, mode="valid")
    average = np.concatenate([np.full((window - 1) // 2, np.nan), smoothed, np.full(window // 2, np.nan)])  # centred
    return line_chart(path, range(1, len(values) + 1), {"per step": values, f"moving average ({window} steps)": average},
               title=f"zk0 train: training loss over {len(values)} steps", xlabel="step",
               ylabel="flow-matching loss (MSE)")


class _Progress:
    def __init__(self, total: int):
        self.total, self.started = total, time.perf_counter()

    def __call__(self, done: int, loss: float) -> None:
        """Called after every step as the trainer's on_step: draws the bar."""
        width = 30
        filled = width * min(done, self.total) // max(self.total, 1)
        rate = done / max(time.perf_counter() - self.started, 1e-9)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} loss {loss:.3f} "
                         f"{rate:.1f} step/s")
        sys.stderr.flush()


def run(args: argparse.Namespace) -> int:
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata

    from zk0.learn.checkpoint import CheckpointMeta, save_checkpoint
    from zk0.learn.data import ConcatData, policy_image_size
    from zk0.learn.frame_cache import sized_frame_cache
    from zk0.learn.evaluate import evaluate_datasets
    from zk0.learn.federation import held_out_data
    from zk0.learn.policy import PolicySpec, seeded_policy_bundle
    from zk0.learn.stats import from_dataset, to_lerobot_stats
    from zk0.learn.sufficient_stats import combine
    from zk0.learn.trainer import LocalTrainer, TrainerConfig

    roots = [Path(r) for r in args.dataset]
    for root in roots:
        if not (root / "meta" / "info.json").is_file():
            print(f"zk0 train: {root} is not a LeRobot dataset (no meta/info.json)", file=sys.stderr)
            return 2
    if len(set(r.resolve() for r in roots)) != len(roots):
        print("zk0 train: a dataset is given twice", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    combined = combine([from_dataset(root) for root in roots])
    meta = LeRobotDatasetMetadata(f"local/{roots[0].name}", root=roots[0])
    bundle = seeded_policy_bundle(PolicySpec(model=args.model, device=args.device), meta, args.seed,
                                  stats=to_lerobot_stats(combined))
    config = bundle.policy.config
    cache = sized_frame_cache(policy_image_size(config), roots, disk_dir=None)
    train_parts, held_out = held_out_data(roots, config, args.eval_fraction, cache=cache)

    metrics: dict = {"model": args.model, "datasets": [str(r) for r in roots], "steps": args.steps,
                     "batch_size": args.batch_size, "seed": args.seed}
    if held_out:
        metrics["eval_before"] = evaluate_datasets(bundle.policy, bundle.preprocessor, held_out)
    train_data = train_parts[0] if len(train_parts) == 1 else ConcatData(train_parts)
    trainer = LocalTrainer(bundle.policy, bundle.preprocessor, train_data,
                           TrainerConfig(batch_size=args.batch_size, seed=args.seed))
    result = trainer.train(None, args.steps, lr=args.lr, on_step=_Progress(args.steps))
    sys.stderr.write("\n")
    metrics["losses"] = result.losses
    metrics["train_seconds"] = result.seconds
    metrics["steps_per_second"] = result.steps_done / result.seconds if result.seconds else None
    if held_out:
        metrics["eval_after"] = evaluate_datasets(bundle.policy, bundle.preprocessor, held_out)
    meta = save_checkpoint(out / "checkpoint", bundle, CheckpointMeta(run=out.name, round=0), stats=combined)
    metrics["checkpoint_sha256"] = meta.sha256
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if metrics["losses"]:
        plot_losses(metrics["losses"], out / "loss.png")
    print(json.dumps({k: metrics[k] for k in ("eval_before", "eval_after", "steps_per_second") if k in metrics}))
    return 0
