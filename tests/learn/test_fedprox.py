import pytest
import torch

from zk0.learn.fedprox import proximal_term, squared_distance, update_norm


def _tensors(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, generator=g), torch.randn(7, generator=g), torch.randn(2, 2, 2, generator=g)]


def test_proximal_term_equals_half_mu_squared_distance_by_hand():
    w, w0, mu = _tensors(0), _tensors(1), 0.3
    by_hand = 0.5 * mu * sum(((a - b) ** 2).sum() for a, b in zip(w, w0))
    assert proximal_term(w, w0, mu).item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_zero_at_global_weights_and_for_zero_mu():
    w = _tensors(0)
    assert proximal_term(w, [t.clone() for t in w], 0.5).item() == 0.0
    assert proximal_term(w, _tensors(1), 0.0).item() == 0.0


def test_gradient_is_mu_times_displacement():
    w = [t.requires_grad_() for t in _tensors(0)]
    w0, mu = _tensors(1), 0.2
    proximal_term(w, w0, mu).backward()
    for p, r in zip(w, w0):
        torch.testing.assert_close(p.grad, mu * (p.detach() - r))


def test_update_norm_is_the_distance_and_mismatched_lists_are_refused():
    w, w0 = _tensors(0), _tensors(1)
    assert update_norm(w, w0) == pytest.approx(squared_distance(w, w0).sqrt().item())
    with pytest.raises(ValueError):
        squared_distance(w, w0[:2])
