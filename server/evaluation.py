"""Server-side evaluation of the global policy on held-out datasets, and early stopping."""

from __future__ import annotations

from collections.abc import Sequence
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
