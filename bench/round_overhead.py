"""Per-message overhead of a federated round, without and with the warm learning worker; JSON on stdout.

Runs `zk0 fleet local` twice on the same two datasets (recorded with `zk0 record --sim` unless `--dataset` is
given), tiny model, the same server config: once as Flower runs ClientApps alone (a fresh process per message
that imports torch and lerobot and builds the policy and data), once with `--learn-workers`. From each run's
`federated_metrics.json`, per round:

- `train_phase_s` / `evaluate_phase_s`: wall time of the round's train / evaluate messages, from the server
  sending them to its last reply (the server's `phase_seconds`);
- `node_train_s`: the longest node training time (`train-seconds`, the optimizer steps themselves; nodes train
  in parallel); `node_eval_s`: the nodes' held-out evaluation time (`eval-seconds`, their weighted mean);
- `train_overhead_s` = train phase - node training, `evaluate_overhead_s` = evaluate phase - node evaluation:
  what a message costs beyond the learning work (Flower delivery and polling, ClientApp start, imports, model
  and data building, encoding);
- `server_s`: the rest of the round (aggregation, the server's own evaluation);
- `overhead_fraction` = (train + evaluate overhead) / round wall time (issue #13's round overhead: wall time
  minus training and evaluation).

Round 1 builds everything in both modes (the worker too, once per run); later rounds show the steady state.
Timings on a shared 2-core machine are noisy: the load averages before and after each run are reported.

  python bench/round_overhead.py [--rounds 3] [--local-steps 8] [--batch-size 4] [--dataset A --dataset B]
                                 [--worker-first]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from zk0.server.run_dir import TARGET_OVERHEAD_FRACTION, summarize_overhead

os.environ.setdefault("HF_HUB_OFFLINE", "1")

def _zk0(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "zk0.cli", *args], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"zk0 {args[0]} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return result


def _record_datasets(root: Path) -> list[Path]:
    config = Path(__file__).resolve().parents[1] / "configs" / "agent.yaml"
    for name, task in (("red", "pick the red cube"), ("blue", "push the blue cube left")):
        _zk0("record", "--sim", "--config", str(config), "--root", str(root), "--dataset", name, "--task", task,
             "--episodes", "4", "--episode-time-s", "1.5", "--reset-time-s", "0", "--no-progress")
    return [root / "red", root / "blue"]


def run_fleet(datasets: Sequence[Path], rounds: int, config: Path, out: Path, workers: bool) -> dict[str, Any]:
    """One `zk0 fleet local` run; its per-round figures and the load averages around it."""
    load_before = os.getloadavg()
    dataset_args = [arg for d in datasets for arg in ("--dataset", str(d))]
    _zk0("fleet", "local", *dataset_args, "--rounds", str(rounds), "--out", str(out), "--model", "tiny",
         "--config", str(config), *(["--learn-workers"] if workers else []))
    history = json.loads((out / "federated_metrics.json").read_text())["rounds"]
    return {**summarize_overhead(history), "load_average_before": load_before, "load_average_after": os.getloadavg()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--dataset", action="append", type=Path, help="node dataset (default: two recorded)")
    parser.add_argument("--worker-first", action="store_true",
                        help="run the fleet with workers first (to tell the worker's effect from a load trend)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        datasets = args.dataset or _record_datasets(work / "datasets")
        config = work / "server.yaml"
        config.write_text(f"training: {{local_steps: {args.local_steps}, batch_size: {args.batch_size}, "
                          "eval_fraction: 0.25}\nevaluation: {max_samples: 16}\nnodes: {round_timeout_s: 600}\n")
        result: dict[str, Any] = {"rounds": args.rounds, "local_steps": args.local_steps, "batch_size": args.batch_size,
                                  "nodes": len(datasets), "target_overhead_fraction": TARGET_OVERHEAD_FRACTION}
        modes = [("without_worker", False), ("with_worker", True)]
        for mode, workers in reversed(modes) if args.worker_first else modes:
            result[mode] = run_fleet(datasets, args.rounds, config, work / mode, workers)
            print(f"{mode}: {json.dumps(result[mode]['warm_mean'])}", file=sys.stderr)
    before, after = result["without_worker"]["warm_mean"], result["with_worker"]["warm_mean"]
    if before and after:
        result["per_message_overhead_ratio"] = after["per_message_overhead_s"] / before["per_message_overhead_s"]
        result["target_met"] = after["overhead_fraction"] <= TARGET_OVERHEAD_FRACTION
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
