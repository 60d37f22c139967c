"""Local SmolVLA training with FedProx: what a host runs in an idle window, and what `zk0 train` runs.

One `train()` call is one budget of optimizer steps starting from a given global state: lerobot's SmolVLA
loss and AdamW preset (betas, eps, weight decay, grad clipping), the proximal term over the trainable
parameters added before backward, bf16 autocast on CUDA only, and a cooperative `should_stop` checked
between steps, so a preempted call still returns a consistent partial update with its true counts.
The optimizer is rebuilt every call: a federated round starts from a new global, and stale Adam moments
from the previous round's local trajectory would bias the first steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

from zk0.learn.data import ConcatData, EpisodeData
from zk0.learn.fedprox import proximal_term, update_norm
from zk0.learn.policy import load_trainable_state, trainable_parameters, trainable_state


@dataclass
class TrainerConfig:
    batch_size: int = 8
    seed: int = 0
    grad_clip_norm: float | None = None  # None: the policy preset's (SmolVLA: 10)
    amp: bool = True  # bf16 autocast, only ever on CUDA


@dataclass
class TrainResult:
    state: dict[str, torch.Tensor]
    steps_done: int
    examples: int
    policy_loss: float  # mean over the steps done
    proximal_loss: float
    grad_norm: float  # mean pre-clipping gradient norm
    update_norm: float  # ||w_local - w_global||
    seconds: float
    losses: list[float] = field(default_factory=list)  # per-step policy loss


def _never() -> bool:
    return False


class SampleStream:
    """Seeded epochs over a dataset's (episode, frame) samples: each epoch a fresh permutation."""

    def __init__(self, samples: list[tuple[int, int]], seed: int):
        if not samples:
            raise ValueError("no training samples")
        self.samples = samples
        self.rng = np.random.default_rng(seed)
        self._order: list[int] = []

    def take(self, n: int) -> list[tuple[int, int]]:
        out = []
        while len(out) < n:
            if not self._order:
                self._order = self.rng.permutation(len(self.samples)).tolist()
            out.append(self.samples[self._order.pop()])
        return out


class LocalTrainer:
    def __init__(self, policy, preprocessor, data: EpisodeData | ConcatData, cfg: TrainerConfig | None = None):
        self.policy = policy
        self.preprocessor = preprocessor
        self.data = data
        self.cfg = cfg or TrainerConfig()
        self.device = next(policy.parameters()).device
        self.stream = SampleStream(data.frame_index(), self.cfg.seed)
        self._calls = 0

    def _optimizer(self, steps: int, lr: float | None):
        config = self.policy.config
        params = trainable_parameters(self.policy)
        optimizer = config.get_optimizer_preset().build(params)
        if lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr
            return optimizer, None
        return optimizer, config.get_scheduler_preset().build(optimizer, steps)

    def _autocast(self):
        if self.cfg.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def train(
        self,
        global_state: Mapping[str, torch.Tensor] | None,
        steps: int,
        lr: float | None = None,
        mu: float = 0.0,
        should_stop: Callable[[], bool] = _never,
        on_step: Callable[[int, float], None] | None = None,
    ) -> TrainResult:
        """Run up to `steps` optimizer steps from `global_state` (None: the policy's current weights).

        lr=None follows lerobot's SmolVLA warmup+cosine preset over `steps`; a number is held constant (the
        server schedules it per round). mu is FedProx's proximal weight (0: plain local SGD, FedAvg).
        `on_step(steps_done, loss)` follows progress after every step (a progress bar, the agent's status).
        """
        if steps < 0 or mu < 0:
            raise ValueError(f"steps and mu must be >= 0 (got steps={steps}, mu={mu})")
        started = time.perf_counter()
        if global_state is not None:
            load_trainable_state(self.policy, global_state)
        params = trainable_parameters(self.policy)
        reference = [p.detach().clone() for p in params]
        optimizer, scheduler = self._optimizer(max(steps, 1), lr)
        clip = self.cfg.grad_clip_norm
        clip = self.policy.config.optimizer_grad_clip_norm if clip is None else clip
        torch.manual_seed(self.cfg.seed + 1_000_003 * self._calls)
        self._calls += 1

        self.policy.train()
        losses, prox_losses, grad_norms = [], [], []
        for _ in range(steps):
            if should_stop():
                break
            batch = self.preprocessor(self.data.batch(self.stream.take(self.cfg.batch_size)))
            with self._autocast():
                loss, _ = self.policy.forward(batch)
            prox = proximal_term(params, reference, mu)
            (loss + prox).backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip and clip > 0 else float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if scheduler is not None:
                scheduler.step()
            losses.append(float(loss.detach()))
            prox_losses.append(float(prox.detach()))
            grad_norms.append(float(grad_norm))
            if on_step is not None:
                on_step(len(losses), losses[-1])

        done = len(losses)
        return TrainResult(
            state=trainable_state(self.policy),
            steps_done=done,
            examples=done * self.cfg.batch_size,
            policy_loss=float(np.mean(losses)) if done else float("nan"),
            proximal_loss=float(np.mean(prox_losses)) if done else 0.0,
            grad_norm=float(np.mean(grad_norms)) if done else 0.0,
            update_norm=update_norm(params, reference),
            seconds=time.perf_counter() - started,
            losses=losses,
        )
