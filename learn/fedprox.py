"""FedProx's proximal term (Li et al., 2020): (mu / 2) * ||w - w_global||^2 over the trainable parameters.

Computed with torch's multi-tensor (_foreach) kernels: one fused subtraction and one fused norm launch over
all tensors instead of a Python loop of per-tensor `.norm()` calls. The norms are squared before summing:
the term is the squared distance, not the distance (Flower's docstring example omits the square).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def squared_distance(params: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_i ||params_i - reference_i||^2 as a 0-dim tensor, differentiable w.r.t. params."""
    if len(params) != len(reference):
        raise ValueError(f"{len(params)} parameters but {len(reference)} reference tensors")
    if not params:
        return torch.zeros(())
    diffs = torch._foreach_sub(list(params), list(reference))
    norms = torch._foreach_norm(diffs, 2)
    return torch.stack(norms).square().sum()


def proximal_term(params: Sequence[torch.Tensor], reference: Sequence[torch.Tensor], mu: float) -> torch.Tensor:
    """(mu / 2) * ||w - w_global||^2; exactly zero (and skipped) when mu == 0."""
    if mu == 0:
        return torch.zeros((), device=params[0].device if params else "cpu")
    return 0.5 * mu * squared_distance(params, reference)


def update_norm(params: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float:
    """||w - w_global||: how far local training moved the trainable parameters."""
    with torch.no_grad():
        return float(squared_distance(params, reference).sqrt())
