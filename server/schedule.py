"""The server's learning-rate and proximal-mu schedule: pure rules, no I/O.

The server decides, before each round, the LR and mu every node trains with. The rules:

- cosine annealing with warm restarts (SGDR): cycles of T0, T0*T_mult, T0*T_mult^2 ... rounds,
  annealing from the base LR down to eta_min within each cycle;
- plateau: when the server eval loss improved by less than 1 % over the last 5 rounds, the LR
  multiplier grows x1.15 (the final LR never exceeds `max_lr`), to push out of a flat region. The
  boost fires once per detected plateau: the next one needs a new full window of 5 rounds trained
  after it (rounds r..r+4 after a boost at round r), so a lasting plateau does not compound it;
- improvement: a round whose loss is at least 1 % (`plateau_min_improvement`) below the best loss
  before it halves the multiplier's excess over 1 (1.15 -> 1.075 -> 1.0375 ...): the boost is
  withdrawn once it has done its job. A multiplier below 1 (spike damping) is left as it is;
- spike: when the loss rose by more than 0.5 over the last 3 rounds, the multiplier is held (no
  plateau boost that round) and damped x`spike_damping`, because a rising loss means steps are too big;
- mu decays x0.98 per round down to `mu_min`: strong pull to the global model early, when clients
  diverge most, weaker later;
- a client whose local loss std exceeds 1.2 trains with at least `unstable_client_mu`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any


@dataclass(frozen=True)
class ScheduleConfig:
    base_lr: float = 1e-4
    t0: int = 15
    t_mult: int = 2
    eta_min: float = 5e-7
    max_lr: float = 2e-4
    plateau_window: int = 5
    plateau_min_improvement: float = 0.01  # relative
    plateau_boost: float = 1.15
    spike_window: int = 3
    spike_rise: float = 0.5  # absolute loss rise
    spike_damping: float = 0.5
    base_mu: float = 0.01
    mu_decay: float = 0.98
    mu_min: float = 0.001
    unstable_loss_std: float = 1.2
    unstable_client_mu: float = 0.02

    def __post_init__(self) -> None:
        checks = [
            (self.base_lr > 0, "base_lr must be > 0"),
            (self.t0 >= 1, "t0 must be >= 1"),
            (self.t_mult >= 1, "t_mult must be >= 1"),
            (0 <= self.eta_min <= self.base_lr, "eta_min must be in [0, base_lr]"),
            (self.max_lr >= self.base_lr, "max_lr must be >= base_lr"),
            (self.plateau_window >= 2, "plateau_window must be >= 2"),
            (self.spike_window >= 2, "spike_window must be >= 2"),
            (0 < self.spike_damping <= 1, "spike_damping must be in (0, 1]"),
            (self.plateau_boost >= 1, "plateau_boost must be >= 1"),
            (0 < self.mu_decay <= 1, "mu_decay must be in (0, 1]"),
            (0 <= self.mu_min <= self.base_mu, "mu_min must be in [0, base_mu]"),
            (self.unstable_client_mu >= 0, "unstable_client_mu must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass(frozen=True)
class ScheduleState:
    """What the schedule carries from round to round (saved with the run's metrics for resume)."""

    lr_scale: float = 1.0
    boost_round: int | None = None  # the round the last plateau boost fired in, if any

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ScheduleState:
        boost_round = data.get("boost_round")
        return cls(float(data.get("lr_scale", 1.0)), None if boost_round is None else int(boost_round))


@dataclass(frozen=True)
class RoundSchedule:
    """The decision for one round."""

    lr: float
    mu: float
    state: ScheduleState
    reason: str  # "cosine", "plateau", "spike", "decay": what moved the LR this round


def cosine_warm_restart_lr(server_round: int, cfg: ScheduleConfig) -> float:
    """SGDR LR for a 1-based `server_round`: cycles of t0, t0*t_mult, ... rounds."""
    if server_round < 1:
        raise ValueError(f"server_round must be >= 1, got {server_round}")
    t_cur, period = server_round - 1, cfg.t0
    while t_cur >= period:
        t_cur -= period
        period *= cfg.t_mult
    return cfg.eta_min + (cfg.base_lr - cfg.eta_min) * (1 + math.cos(math.pi * t_cur / period)) / 2


def is_plateau(losses: Sequence[float], cfg: ScheduleConfig) -> bool:
    """True when the best of the last `plateau_window` losses is < 1 % below the window's first."""
    if len(losses) < cfg.plateau_window:
        return False
    window = losses[-cfg.plateau_window:]
    first = window[0]
    improvement = (first - min(window)) / abs(first) if first != 0 else 0.0
    return improvement < cfg.plateau_min_improvement


def is_spike(losses: Sequence[float], cfg: ScheduleConfig) -> bool:
    """True when the loss rose by more than `spike_rise` across the last `spike_window` rounds."""
    if len(losses) < cfg.spike_window:
        return False
    return losses[-1] - losses[-cfg.spike_window] > cfg.spike_rise


def is_improvement(losses: Sequence[float], cfg: ScheduleConfig) -> bool:
    """True when the last loss is at least `plateau_min_improvement` (relative) below the best before it."""
    if len(losses) < 2:
        return False
    best_before = min(losses[:-1])
    return best_before - losses[-1] >= cfg.plateau_min_improvement * abs(best_before)


def boost_allowed(server_round: int, state: ScheduleState, cfg: ScheduleConfig) -> bool:
    """A plateau boost may fire only once a full window of rounds has trained since the last one."""
    return state.boost_round is None or server_round - state.boost_round >= cfg.plateau_window


def global_mu(server_round: int, cfg: ScheduleConfig) -> float:
    """mu for a 1-based round: base_mu * mu_decay^(round-1), never below mu_min."""
    return max(cfg.mu_min, cfg.base_mu * cfg.mu_decay ** (server_round - 1))


def client_mu(mu: float, client_loss_std: float | None, cfg: ScheduleConfig) -> float:
    """A client whose local loss std exceeds the threshold is pulled harder to the global model."""
    if client_loss_std is not None and client_loss_std > cfg.unstable_loss_std:
        return max(mu, cfg.unstable_client_mu)
    return mu


def schedule_round(
    server_round: int, eval_losses: Sequence[float], state: ScheduleState, cfg: ScheduleConfig
) -> RoundSchedule:
    """LR and mu for `server_round`, given the server eval losses of the rounds before it."""
    lr_scale, boost_round, reason = state.lr_scale, state.boost_round, "cosine"
    if is_spike(eval_losses, cfg):
        lr_scale, reason = lr_scale * cfg.spike_damping, "spike"
    elif is_plateau(eval_losses, cfg):
        if boost_allowed(server_round, state, cfg):
            lr_scale, boost_round, reason = lr_scale * cfg.plateau_boost, server_round, "plateau"
    elif lr_scale > 1 and is_improvement(eval_losses, cfg):
        lr_scale, reason = 1 + (lr_scale - 1) / 2, "decay"
    lr = cosine_warm_restart_lr(server_round, cfg) * lr_scale
    if lr > cfg.max_lr:
        # Keep the multiplier where it reaches the cap, so it does not keep growing invisibly.
        lr_scale *= cfg.max_lr / lr
        lr = cfg.max_lr
    return RoundSchedule(
        lr=lr, mu=global_mu(server_round, cfg), state=replace(state, lr_scale=lr_scale, boost_round=boost_round),
        reason=reason
    )
