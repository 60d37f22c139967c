"""Held-out SmolVLA loss with frozen randomness, so the number moves only when the model does.

SmolVLA's flow-matching loss depends on the sampled noise and timestep. Here both are drawn once per
evaluation from a seeded generator (forked, so the caller's RNG stream is untouched) for every evaluated
sample, and passed to `policy.forward(noise=..., time=...)`. Samples are spread evenly over all held-out
episodes' frames (not the first batches), and per-sample losses are averaged, so batch size does not matter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from zk0.learn.data import EpisodeData


@dataclass(frozen=True)
class EvalConfig:
    max_samples: int = 64
    batch_size: int = 16
    seed: int = 1234


def spread_samples(samples: list, n: int) -> list:
    """n samples evenly spaced over the whole list (all of it when n >= len)."""
    if n >= len(samples):
        return list(samples)
    return [samples[i] for i in np.linspace(0, len(samples) - 1, n).round().astype(int)]


@torch.no_grad()
def evaluate_loss(policy, preprocessor, data: EpisodeData, cfg: EvalConfig = EvalConfig()) -> tuple[float, int]:
    """(mean held-out loss, samples evaluated) of `policy` on `data` with seeded noise and timesteps."""
    samples = spread_samples(data.frame_index(), cfg.max_samples)
    if not samples:
        raise ValueError(f"{data.root}: no held-out samples to evaluate")
    device = next(policy.parameters()).device
    config = policy.config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        noise = torch.randn(len(samples), config.chunk_size, config.max_action_dim)
        time = policy.model.sample_time(len(samples), torch.device("cpu"))
    was_training = policy.training
    policy.eval()
    total = 0.0
    try:
        for start in range(0, len(samples), cfg.batch_size):
            chunk = samples[start : start + cfg.batch_size]
            batch = preprocessor(data.batch(chunk))
            end = start + len(chunk)
            per_sample, _ = policy.forward(
                batch, noise=noise[start:end].to(device), time=time[start:end].to(device), reduction="none"
            )
            total += float(per_sample.sum())
    finally:
        policy.train(was_training)
    return total / len(samples), len(samples)


def evaluate_datasets(policy, preprocessor, datasets: Mapping[str, EpisodeData],
                      cfg: EvalConfig = EvalConfig()) -> dict[str, float]:
    """Loss per dataset name, plus "composite": the sample-weighted mean over all of them."""
    results, weighted, count = {}, 0.0, 0
    for name, data in datasets.items():
        loss, n = evaluate_loss(policy, preprocessor, data, cfg)
        results[name] = loss
        weighted += loss * n
        count += n
    results["composite"] = weighted / count
    return results
