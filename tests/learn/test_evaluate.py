import torch

from zk0.learn.evaluate import EvalConfig, evaluate_datasets, evaluate_loss, spread_samples


def test_spread_samples_covers_the_whole_range():
    samples = list(range(100))
    picked = spread_samples(samples, 5)
    assert picked[0] == 0 and picked[-1] == 99 and len(picked) == 5
    assert spread_samples(samples[:3], 5) == [0, 1, 2]


def test_loss_is_fixed_by_seed_independent_of_batching_and_leaves_rng_alone(tiny_setup):
    bundle, _, held = tiny_setup
    torch.manual_seed(7)
    expected_next = torch.rand(1)
    torch.manual_seed(7)
    a, n = evaluate_loss(bundle.policy, bundle.preprocessor, held, EvalConfig(max_samples=12, batch_size=4))
    assert torch.equal(torch.rand(1), expected_next)
    b, _ = evaluate_loss(bundle.policy, bundle.preprocessor, held, EvalConfig(max_samples=12, batch_size=12))
    c, _ = evaluate_loss(bundle.policy, bundle.preprocessor, held, EvalConfig(max_samples=12, seed=99))
    assert n == 12 and abs(a - b) < 1e-5 and a != c
    episodes = {ep for ep, _ in spread_samples(held.frame_index(), 12)}
    assert episodes == set(held.episode_indices)


def test_composite_is_the_sample_weighted_mean(tiny_setup):
    bundle, train, held = tiny_setup
    cfg = EvalConfig(max_samples=8)
    results = evaluate_datasets(bundle.policy, bundle.preprocessor, {"a": held, "b": train}, cfg)
    assert abs(results["composite"] - (results["a"] + results["b"]) / 2) < 1e-6
