"""Federated normalization statistics: exact combination, lerobot format, refusal of mismatches."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from zk0.learn.stats import from_dataset, to_lerobot_stats, with_stats
from zk0.learn.sufficient_stats import HistogramSpec, StatsMismatch, SufficientStats, combine, from_arrays

SPEC = HistogramSpec(-100.0, 100.0, 400)
finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def hosts_frames(draw):
    """Frames of one 3-dim feature split across 1..5 hosts, each with at least one frame."""
    sizes = draw(st.lists(st.integers(1, 20), min_size=1, max_size=5))
    offset = draw(st.floats(-500, 500))
    return [draw(arrays(np.float64, (n, 3), elements=finite)) + offset for n in sizes]


@settings(max_examples=60, deadline=None)
@given(hosts_frames())
def test_combined_host_stats_equal_stats_of_the_union(parts):
    combined = combine([from_arrays({"action": p}, SPEC) for p in parts])
    union = from_arrays({"action": np.concatenate(parts)}, SPEC)
    got, want = combined.features["action"], union.features["action"]
    assert got.count == want.count
    scale = np.abs(np.concatenate(parts)).max() + 1.0
    np.testing.assert_allclose(got.mean, want.mean, rtol=0, atol=1e-12 * scale)
    np.testing.assert_allclose(got.m2, want.m2, rtol=1e-9, atol=1e-9 * scale**2)
    np.testing.assert_array_equal(got.min, want.min)
    np.testing.assert_array_equal(got.max, want.max)
    np.testing.assert_array_equal(got.hist_counts, want.hist_counts)


def test_mean_std_survive_a_large_offset_with_tiny_spread():
    # E[x^2] - E[x]^2 in float64 loses every digit here; the M2 formulation must not.
    rng = np.random.default_rng(1)
    frames = 1e6 + rng.normal(0.0, 1e-3, size=(3000, 1))
    parts = np.array_split(frames, 7)
    lerobot = to_lerobot_stats(combine([from_arrays({"x": p}, None) for p in parts]))["x"]
    np.testing.assert_allclose(lerobot["std"], frames.std(axis=0), rtol=1e-6)


def test_lerobot_format_matches_numpy_and_quantiles_are_within_one_bin():
    rng = np.random.default_rng(0)
    frames = rng.normal(10.0, 20.0, size=(5000, 6))
    stats = to_lerobot_stats(from_arrays({"observation.state": frames}, SPEC))["observation.state"]
    assert set(stats) == {"mean", "std", "min", "max", "count", "q01", "q10", "q50", "q90", "q99"}
    assert stats["count"].shape == (1,) and stats["count"][0] == 5000
    np.testing.assert_allclose(stats["mean"], frames.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats["std"], frames.std(axis=0), rtol=1e-12)
    for key, q in (("q01", 0.01), ("q10", 0.10), ("q50", 0.5), ("q90", 0.9), ("q99", 0.99)):
        np.testing.assert_allclose(stats[key], np.quantile(frames, q, axis=0), atol=SPEC.bin_width)


def test_record_round_trip_is_lossless():
    rng = np.random.default_rng(2)
    stats = from_arrays({"observation.state": rng.normal(size=(50, 6)), "action": rng.normal(size=(50, 6))}, SPEC)
    record = stats.to_record()
    assert all(isinstance(v, np.ndarray) for v in record.values())
    back = SufficientStats.from_record(record)
    for name, fs in stats.features.items():
        other = back.features[name]
        assert other.count == fs.count and other.histogram == fs.histogram
        for field in ("mean", "m2", "min", "max", "hist_counts"):
            np.testing.assert_array_equal(getattr(other, field), getattr(fs, field))


def test_mismatching_features_are_refused_with_the_feature_name():
    a = from_arrays({"action": np.zeros((3, 6)), "observation.state": np.zeros((3, 6))}, SPEC)
    other_shape = from_arrays({"action": np.zeros((3, 7)), "observation.state": np.zeros((3, 6))}, SPEC)
    other_names = from_arrays({"action": np.zeros((3, 6)), "observation.effort": np.zeros((3, 6))}, SPEC)
    other_bins = from_arrays({"action": np.zeros((3, 6)), "observation.state": np.zeros((3, 6))}, HistogramSpec())
    with pytest.raises(StatsMismatch, match="'action'.*shape"):
        combine([a, other_shape])
    with pytest.raises(StatsMismatch, match="observation.effort|observation.state"):
        combine([a, other_names])
    with pytest.raises(StatsMismatch, match="histogram"):
        combine([a, other_bins])
    with pytest.raises(StatsMismatch, match="lack"):
        SufficientStats.from_record({"action/mean": np.zeros(6)})


def test_hosts_reading_their_episodes_combine_to_lerobots_dataset_stats(dataset_root):
    host_a = from_dataset(dataset_root, episodes=[0])
    host_b = from_dataset(dataset_root, episodes=[1, 2, 3])
    assert set(host_a.features) == {"observation.state", "action"}  # never the cameras
    combined = to_lerobot_stats(combine([host_a, host_b]))
    whole = to_lerobot_stats(from_dataset(dataset_root))
    reference = json.loads((dataset_root / "meta" / "stats.json").read_text())
    for name in ("observation.state", "action"):
        assert combined[name]["count"][0] == whole[name]["count"][0] == reference[name]["count"][0]
        for key in ("mean", "std", "min", "max"):
            np.testing.assert_allclose(combined[name][key], whole[name][key], rtol=1e-12, atol=1e-9)
            np.testing.assert_allclose(combined[name][key], reference[name][key], rtol=1e-4, atol=1e-4)
    with pytest.raises(StatsMismatch, match="observation.images.front"):
        from_dataset(dataset_root, features=["observation.images.front"])


def test_combined_stats_drive_lerobots_normalizers_and_survive_save(tmp_path):
    from lerobot.configs import FeatureType, NormalizationMode, PolicyFeature
    from lerobot.processor import (
        NormalizerProcessorStep,
        PolicyProcessorPipeline,
        UnnormalizerProcessorStep,
    )
    from lerobot.processor.converters import identity_transition

    features = {
        "observation.state": PolicyFeature(FeatureType.STATE, (6,)),
        "action": PolicyFeature(FeatureType.ACTION, (6,)),
    }
    norm_map = {FeatureType.STATE: NormalizationMode.MEAN_STD, FeatureType.ACTION: NormalizationMode.MEAN_STD}
    pre = PolicyProcessorPipeline(steps=[NormalizerProcessorStep(features=features, norm_map=norm_map)],
                                  to_transition=identity_transition, to_output=identity_transition)
    post = PolicyProcessorPipeline(steps=[UnnormalizerProcessorStep(features=features, norm_map=norm_map)],
                                   to_transition=identity_transition, to_output=identity_transition)
    rng = np.random.default_rng(3)
    frames = {"observation.state": rng.normal(5, 3, (40, 6)), "action": rng.normal(-2, 7, (40, 6))}
    stats = combine([from_arrays({k: v[:15] for k, v in frames.items()}),
                     from_arrays({k: v[15:] for k, v in frames.items()})])
    new_pre, new_post = with_stats(pre, post, stats)
    lerobot = to_lerobot_stats(stats)

    new_pre.save_pretrained(tmp_path, config_filename="pre.json")
    loaded = PolicyProcessorPipeline.from_pretrained(tmp_path, config_filename="pre.json",
                                                     to_transition=identity_transition,
                                                     to_output=identity_transition)
    import torch

    state = torch.tensor(frames["observation.state"][:2], dtype=torch.float32)
    from lerobot.lerobot_types import TransitionKey

    out = loaded({TransitionKey.OBSERVATION: {"observation.state": state}})
    expected = (state.numpy() - lerobot["observation.state"]["mean"]) / (lerobot["observation.state"]["std"] + 1e-8)
    np.testing.assert_allclose(out[TransitionKey.OBSERVATION]["observation.state"].numpy(), expected, rtol=1e-5)
    restored = new_post({TransitionKey.ACTION: torch.zeros(1, 6)})[TransitionKey.ACTION]
    np.testing.assert_allclose(restored.numpy()[0], lerobot["action"]["mean"], rtol=1e-6)

    wrong = from_arrays({"observation.state": np.zeros((4, 5)), "action": np.zeros((4, 6))})
    with pytest.raises(StatsMismatch, match="observation.state"):
        with_stats(pre, post, wrong)
