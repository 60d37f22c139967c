"""The base policy every arm starts from, and the arms trained without a federation (`zk0 train`).

The base is a lerobot checkpoint directory. `--base` takes one, or a preset name:
- `sim-base`: the small SmolVLA pretrained for the simulated world (`zk0 model sim-base OUT --seed S`), built
  once into `~/.cache/zk0/sim-base/seed-S` and reused;
- `tiny`: the untrained tiny stand-in, saved as a checkpoint by `zk0 train --steps 0` (for developing the
  harness: it does not learn to succeed).
From a checkpoint, every arm fine-tunes only the action expert with the VLM frozen (zk0.learn.policy), and all
of them build the same model from it: `zk0 train --model PATH` and the federation's `model: PATH` both load it.

Centralized and local-only arms are `zk0 train` runs (its own code, as a subprocess: the same command a user
runs), with its default SmolVLA warmup + cosine LR over the arm's steps and the union's (or the host's)
normalization statistics.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

PRESETS = ("sim-base", "tiny")


def default_base(quick: bool) -> str:
    """The full run starts from the sim base (it succeeds at all); `--quick` is a smoke run of every step and
    takes the tiny stand-in, whose checkpoint costs seconds where a first sim-base build costs ~10 minutes."""
    return "tiny" if quick else "sim-base"


# what `zk0 model sim-base` logs as it goes (zk0.learn.sim_base, zk0.learn.model_cli)
_BUILD_PROGRESS = re.compile(r"recorded \d+/\d+|pretraining \d+/\d+ steps")


def last_progress(log_text: str) -> str | None:
    """The latest progress fragment in a sim-base build's log, if any."""
    found = _BUILD_PROGRESS.findall(log_text)
    return found[-1] if found else None


def _zk0(args: Sequence[str], log_path: Path, progress: Callable[[str], None] | None = None,
         every_s: float = 30.0) -> None:
    """`zk0 ARGS` as a child logging to `log_path`; with `progress`, its latest progress line every `every_s`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        start = log.tell()  # the log may hold an earlier build's lines: progress is read from here on
        child = subprocess.Popen([sys.executable, "-m", "zk0.cli", *args], stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL)
        try:
            while True:
                try:
                    returncode = child.wait(timeout=every_s if progress else None)
                    break
                except subprocess.TimeoutExpired:
                    with open(log_path, errors="replace") as written:
                        written.seek(start)
                        line = last_progress(written.read())
                    if line:
                        progress(line)
        finally:
            if child.poll() is None:  # interrupted: the build must not outlive the command that started it
                child.kill()
                child.wait()
    if returncode != 0:
        raise RuntimeError(f"zk0 {' '.join(args[:2])} exited {returncode}; see {log_path}")


def cached_sim_base(seed: int, log_path: Path, progress: Callable[[str], None] | None = None) -> Path:
    """The sim base built from `seed`, from zk0's cache (built there by `zk0 model sim-base` on first use, in a
    process of its own, logging to `log_path`); `zk0 demo` and `zk0 experiment` share it."""
    from zk0.learn.sim_base import cache_dir, is_current

    checkpoint = cache_dir(seed)
    if not is_current(checkpoint):
        _zk0(["model", "sim-base", str(checkpoint), "--seed", str(seed)], log_path, progress)
    return checkpoint


def prepare_base(base: str, work_dir: Path, datasets: Sequence[Path], seed: int,
                 progress: Callable[[str], None] | None = None) -> Path:
    """The base checkpoint directory for `base` (a preset name or a checkpoint path), built if needed."""
    from zk0.learn.sim_base import is_built

    if base == "sim-base":
        checkpoint = cached_sim_base(seed, work_dir / "logs" / "sim-base.log", progress)
    elif base == "tiny":
        checkpoint = work_dir / "base" / "checkpoint"
        if not is_built(checkpoint):
            vlm = work_dir / "base" / "tiny-vlm"
            _zk0(["model", "tiny", str(vlm)], work_dir / "logs" / "base.log")
            _zk0(["train", *[a for d in datasets for a in ("--dataset", str(d))], "--steps", "0", "--model", str(vlm),
                  "--seed", str(seed), "--out", str(work_dir / "base"), "--device", "cpu"],
                 work_dir / "logs" / "base.log")
    else:
        checkpoint = Path(base).resolve()
    if not is_built(checkpoint):
        raise FileNotFoundError(f"base {base!r}: no checkpoint at {checkpoint} (config.json + model.safetensors)")
    return checkpoint


def fine_tuning_lr(checkpoint: Path) -> float:
    """The LR the base's config asks fine-tuning to peak at (SmolVLA's `optimizer_lr`): `zk0 train` follows it,
    and FedAvg's constant LR is set to it, so those two arms step alike."""
    return float(json.loads((checkpoint / "config.json").read_text())["optimizer_lr"])


def train_arm(name: str, base: Path, datasets: Sequence[Path], steps: int, batch_size: int, seed: int,
              out: Path, log_dir: Path) -> dict[str, Any]:
    """`zk0 train` from `base` on `datasets` for `steps`: its checkpoint, wall seconds (the whole command) and
    train seconds (the optimizer steps, from its metrics.json)."""
    started = time.monotonic()
    _zk0(["train", *[a for d in datasets for a in ("--dataset", str(d))], "--steps", str(steps), "--model", str(base),
          "--batch-size", str(batch_size), "--seed", str(seed), "--out", str(out), "--device", "cpu"],
         log_dir / f"train-{name}.log")
    metrics = json.loads((out / "metrics.json").read_text())
    return {"checkpoint": out / "checkpoint", "wall_s": time.monotonic() - started,
            "train_s": metrics.get("train_seconds"), "steps": len(metrics.get("losses", []))}
