"""Update validation and aggregation rules of the zk0 strategy: pure functions, no Flower, no I/O.

- `decode_update`: the codec's checks (framing, SHA-256, layout, delta base, finite values) as one refusal;
- `norm_rejections`: the L2 distance bound relative to the round's lower-median update (and an optional
  absolute bound);
- `example_weight`: a node's claimed example count as an aggregation weight, capped at what the round asked;
- `aggregate_states`: example-weighted mean, coordinate-wise trimmed mean (`trim_per_side`) or median.

The reasons they give are the lines the server logs and records for a node's update.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from zk0.learn import codec


class UpdateRejected(ValueError):
    """An update the server refuses; `reason` is the one line that is logged and recorded."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def state_norm_distance(update: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of (update - reference) over all tensors, in float64."""
    total = 0.0
    for key, value in update.items():
        total += float(torch.sum((value.double() - reference[key].double()) ** 2))
    return math.sqrt(total)


def decode_update(payload: bytes, global_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Decoded update tensors, or `UpdateRejected` with the codec's reason."""
    try:
        return codec.decode(payload, global_state)
    except codec.CodecError as err:
        raise UpdateRejected(err.reason) from None


def lower_median(values: Sequence[float]) -> float:
    """The median, or of two middle values the lower one."""
    if not values:
        raise ValueError("no values")
    return sorted(values)[(len(values) - 1) // 2]


def norm_rejections(distances: Sequence[float], multiple: float | None, max_norm: float | None,
                    previous_reference: float | None) -> tuple[float | None, list[str | None]]:
    """(the round's reference distance, a rejection reason or None per update) for the updates' L2 distances.

    The reference is the lower median of the distances (with two updates, the smaller: a huge update cannot
    raise its own bound); a round with one update uses `previous_reference` (the previous rounds' median
    accepted distance per unit of LR x step, times this update's LR x steps), or has none. No reference (or a zero one) or `multiple`
    None: no relative bound.
    """
    reference = lower_median(distances) if len(distances) >= 2 else previous_reference
    relative = multiple * reference if multiple is not None and reference else None
    reasons: list[str | None] = []
    for distance in distances:
        if relative is not None and distance > relative:
            reasons.append(f"update is {distance:.4g} from the global (L2), above {multiple:g} x the round's "
                           f"reference {reference:.4g} = {relative:.4g}")
        elif max_norm is not None and distance > max_norm:
            reasons.append(f"update is {distance:.4g} from the global (L2), above the bound {max_norm:.4g}")
        else:
            reasons.append(None)
    return reference, reasons


def update_steps(claimed: float | None, asked: int | None) -> float:
    """Optimizer steps an update stands for, to scale a per-(LR x step) norm reference: what the node claims,
    never more than the round asked for (so a node cannot widen its own bound); the round's ask when the
    claim is missing or not a positive number; 1 when neither is known."""
    valid = claimed is not None and math.isfinite(claimed) and claimed > 0
    if asked is None:
        return float(claimed) if valid else 1.0
    return float(min(claimed, asked)) if valid else float(asked)


def example_cap(train_config: Mapping[str, Any]) -> int | None:
    """The most examples a node can have trained on in a round: local-steps x batch-size (None: unknown)."""
    if "local-steps" in train_config and "batch-size" in train_config:
        return int(train_config["local-steps"]) * int(train_config["batch-size"])
    return None


def example_weight(claimed: float | None, cap: int | None) -> tuple[float, str]:
    """(aggregation weight, note) for a node's claimed example count: capped at `cap`, noted when it is.

    `UpdateRejected` for a claim that is missing, not finite or not positive.
    """
    if claimed is None or not math.isfinite(claimed) or claimed <= 0:
        raise UpdateRejected(f"claims {claimed} examples: not a positive number")
    if cap is not None and claimed > cap:
        return float(cap), f"claimed {claimed:.0f} examples, weighted as {cap} (local-steps x batch-size)"
    return float(claimed), ""


MIN_TRIMMED = 3  # fewer updates leave nothing to trim: trimmed mean is then their plain mean


def trim_per_side(n: int, fraction: float) -> int:
    """Values trimmed per side by trimmed mean: max(1, floor(fraction * n)) from MIN_TRIMMED values on, none below."""
    return max(1, int(fraction * n)) if n >= MIN_TRIMMED else 0


def aggregate_states(
    updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], method: str, trim_fraction: float = 0.2
) -> dict[str, torch.Tensor]:
    """Combine validated updates: example-weighted mean, or coordinate-wise trimmed mean / median.

    The robust rules ignore weights on purpose: a node could inflate its example count to dominate.
    Trimmed mean drops `trim_per_side` values from each end per coordinate.
    """
    if not updates:
        raise ValueError("no updates to aggregate")
    if len(weights) != len(updates) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError("weights must be one non-negative number per update, not all zero")
    out: dict[str, torch.Tensor] = {}
    for key in updates[0]:
        stacked = torch.stack([u[key].to(torch.float64) for u in updates])
        if method == "fedavg":
            w = torch.tensor(weights, dtype=torch.float64).reshape(-1, *[1] * (stacked.dim() - 1))
            value = (stacked * w).sum(0) / w.sum()
        elif method == "median":
            value = stacked.median(0).values if len(updates) % 2 else stacked.quantile(0.5, dim=0)
        elif method == "trimmed-mean":
            cut = trim_per_side(len(updates), trim_fraction)
            ordered = stacked.sort(0).values
            value = ordered[cut:len(updates) - cut].mean(0)
        else:
            raise ValueError(f"unknown aggregation {method!r}")
        out[key] = value.to(updates[0][key].dtype)
    return out
