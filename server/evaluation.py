"""The federated policy as both sides build it, server-side evaluation, and early stopping.

Server and nodes must hold the same frozen weights, since only trainable tensors travel: both build
the policy with `build_federated_policy` from the same model spec, seed and agreed normalization
statistics, and the server sends `frozen_sha256` of its frozen tensors so a node that built a
different model refuses to train instead of sending a meaningless update.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from zk0.learn import stats as fedstats
from zk0.learn.data import EpisodeData, FrameCache, policy_image_size, split_episodes
from zk0.learn.evaluate import EvalConfig, evaluate_datasets
from zk0.learn.policy import PolicyBundle, PolicySpec, make_policy_bundle

# Small chunks keep a tiny-model federation fast on CPU; full models use SmolVLA's own 50.
TINY_CHUNK = 10


def policy_spec(model: str, device: str) -> PolicySpec:
    chunk = TINY_CHUNK if model == "tiny" else 50
    return PolicySpec(model=model, device=device, chunk_size=chunk, n_action_steps=chunk)


def build_federated_policy(model: str, device: str, dataset_root: Path, stats: fedstats.SufficientStats,
                           seed: int) -> PolicyBundle:
    """The federation's policy for a dataset's features, normalizing with the agreed `stats`."""
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata

    meta = LeRobotDatasetMetadata(f"local/{dataset_root.name}", root=dataset_root)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # randomly initialised (tiny / full-random) frozen weights must match everywhere
        return make_policy_bundle(policy_spec(model, device), meta, stats=fedstats.to_lerobot_stats(stats))


def frozen_sha256(policy: torch.nn.Module) -> str:
    """Digest of every tensor that does not travel (frozen parameters and buffers)."""
    digest = hashlib.sha256()
    trainable = {name for name, p in policy.named_parameters() if p.requires_grad}
    for name, tensor in sorted(policy.state_dict().items()):
        if name in trainable:
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def held_out_data(roots: Sequence[Path], policy_config: Any, eval_fraction: float, seed: int,
                  cache: FrameCache | None = None) -> tuple[list[EpisodeData], dict[str, EpisodeData]]:
    """(train parts, held-out parts by dataset name) with the episode split every participant uses."""
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata

    cache = cache or FrameCache()
    train, held_out = [], {}
    for root in roots:
        meta = LeRobotDatasetMetadata(f"local/{root.name}", root=root)
        data = EpisodeData(root, policy_config.chunk_size, policy_image_size(policy_config), cache)
        train_eps, eval_eps = split_episodes(meta.total_episodes, eval_fraction, seed)
        train.append(data.subset(train_eps))
        if eval_eps:
            held_out[root.name] = data.subset(eval_eps)
    return train, held_out


class ServerEvaluator:
    """Fixed-noise held-out loss of the global policy on the server's datasets."""

    def __init__(self, bundle: PolicyBundle, roots: Sequence[Path], eval_fraction: float, seed: int,
                 max_samples: int):
        _, self.held_out = held_out_data(roots, bundle.policy.config, eval_fraction, seed)
        if not self.held_out:
            raise ValueError("server evaluation needs datasets with at least 2 episodes (one is held out)")
        self.bundle = bundle
        self.config = EvalConfig(max_samples=max_samples, seed=seed + 1234)

    def evaluate(self) -> dict[str, float]:
        """Loss per dataset and "loss": the sample-weighted composite."""
        results = evaluate_datasets(self.bundle.policy, self.bundle.preprocessor, self.held_out, self.config)
        results["loss"] = results.pop("composite")
        return results


@dataclass(frozen=True)
class EarlyStopping:
    patience: int  # 0: never stop
    min_delta: float = 0.0

    def should_stop(self, losses: Sequence[float]) -> bool:
        """True when none of the last `patience` losses beat the best before them by `min_delta`."""
        if self.patience <= 0 or len(losses) <= self.patience:
            return False
        best_before = min(losses[: -self.patience])
        return min(losses[-self.patience:]) > best_before - self.min_delta
