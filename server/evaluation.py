"""Server-side evaluation of the global policy on held-out datasets, what the server tells nodes about each
global, and early stopping."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from zk0.learn.evaluate import EvalConfig, evaluate_datasets
from zk0.learn.federation import held_out_data
from zk0.learn.policy import PolicyBundle


class ServerEvaluator:
    """Fixed-noise held-out loss of the global policy on the server's datasets."""

    def __init__(self, bundle: PolicyBundle, roots: Sequence[Path], eval_fraction: float, seed: int,
                 max_samples: int):
        _, self.held_out = held_out_data(roots, bundle.policy.config, eval_fraction)
        if not self.held_out:
            raise ValueError("server evaluation needs datasets with at least 2 episodes (one is held out)")
        self.bundle = bundle
        self.config = EvalConfig(max_samples=max_samples, seed=seed + 1234)

    def evaluate(self) -> dict[str, float]:
        """Loss per dataset and "loss": the sample-weighted composite."""
        results = evaluate_datasets(self.bundle.policy, self.bundle.preprocessor, self.held_out, self.config)
        results["loss"] = results.pop("composite")
        return results


def server_metrics(server_eval: Mapping[str, float], train: Mapping[str, float] | None, lr: float, mu: float,
                   nodes: int) -> dict[str, float]:
    """What the server knows of a round's global, sent with it (zk0.learn.records.SERVER_METRICS_RECORD) to every
    node's policy store, which keeps it as the version's server metrics:

    eval/loss              the global's held-out loss on the server's datasets (ServerEvaluator, sample-weighted);
    eval/loss/<dataset>    the same per dataset;
    round/lr, round/mu     the round's scheduled LR and mu; round/nodes: the nodes asked to train;
    train/<metric>         the accepted updates' training metrics as aggregated (Zk0FedProx.aggregate_train:
                           example-weighted means of what the nodes reported, e.g. train/policy-loss, train/mu,
                           which a node's raised mu lifts above round/mu; train/num-examples their total);
                           train/accepted-updates: how many; 0 when none was, and the global is the previous one.
    """
    metrics = {"eval/loss": float(server_eval["loss"])}
    metrics.update({f"eval/loss/{name}": float(v) for name, v in server_eval.items() if name != "loss"})
    metrics.update({"round/lr": float(lr), "round/mu": float(mu), "round/nodes": float(nodes)})
    # sorted: the aggregated keys come from a set, and `zk0 policy show` prints them in the order stored
    metrics.update({f"train/{name}": float(v) for name, v in sorted((train or {"accepted-updates": 0}).items())})
    return metrics


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
