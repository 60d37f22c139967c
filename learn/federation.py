"""The contract between the zk0 server and its nodes: message record names, normalization-stat records,
and the federated policy both sides build.

Server and nodes must hold the same frozen weights, since only trainable tensors travel: both build
the policy with `build_federated_policy` from the same model spec, seed and agreed normalization
statistics, and the server sends `frozen_sha256` of its frozen tensors so a node that built a
different model refuses to train instead of sending a meaningless update.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from zk0.learn.data import EpisodeData, dataset_stable_id, policy_image_size, split_episodes
from zk0.learn.frame_cache import FrameCache
from zk0.learn.policy import PolicyBundle, PolicySpec, seeded_policy_bundle
# The record names live in zk0.learn.records (importable without torch); they stay importable from here.
from zk0.learn.records import (  # noqa: F401
    DATASET_ID, DECLINED, GLOBAL_SHA256, INFO_RECORD, METRICS_RECORD, NODE_NAME, PREEMPTED, QUERY_STATS, STATS_RECORD,
    UPDATE_RECORD,
)
from zk0.learn.stats import to_lerobot_stats
from zk0.learn.sufficient_stats import StatsInvalid, SufficientStats


def stats_to_record(stats: SufficientStats) -> ArrayRecord:
    return ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in stats.to_record().items()})


def stats_from_record(record: ArrayRecord) -> SufficientStats:
    """A node's statistics as sent; anything malformed raises `StatsInvalid` (the server refuses it)."""
    arrays = {}
    for key, array in record.items():
        try:
            arrays[key] = array.numpy()
        except Exception as exc:  # untrusted bytes: whatever deserializing them raises, it is a bad record
            raise StatsInvalid(f"stats record array {key!r} is unreadable: {exc}") from None
    return SufficientStats.from_record(arrays)


# Small chunks keep a tiny-model federation fast on CPU; full models use SmolVLA's own 50.
TINY_CHUNK = 10


def policy_spec(model: str, device: str) -> PolicySpec:
    chunk = TINY_CHUNK if model == "tiny" else 50
    return PolicySpec(model=model, device=device, chunk_size=chunk, n_action_steps=chunk)


def build_federated_policy(model: str, device: str, dataset_root: Path, stats: SufficientStats,
                           seed: int) -> PolicyBundle:
    """The federation's policy for a dataset's features, normalizing with the agreed `stats`."""
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata

    meta = LeRobotDatasetMetadata(f"local/{dataset_root.name}", root=dataset_root)
    # randomly initialised (tiny / full-random) frozen weights must match everywhere
    return seeded_policy_bundle(policy_spec(model, device), meta, seed, stats=to_lerobot_stats(stats))


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


def held_out_data(roots: Sequence[Path], policy_config: Any, eval_fraction: float, *,
                  cache: FrameCache | None = None) -> tuple[list[EpisodeData], dict[str, EpisodeData]]:
    """(train parts, held-out parts by dataset name) with the episode split every participant uses.

    The split is each dataset's own (`split_episodes` over `dataset_stable_id`): an episode keeps its side as
    the dataset grows, whoever evaluates it.
    """
    cache = cache or FrameCache()
    train, held_out = [], {}
    for root in roots:
        data = EpisodeData(root, policy_config.chunk_size, policy_image_size(policy_config), cache)
        train_eps, eval_eps = split_episodes(dataset_stable_id(root), data.meta.total_episodes, eval_fraction)
        train.append(data.subset(train_eps))
        if eval_eps:
            held_out[root.name] = data.subset(eval_eps)
    return train, held_out
