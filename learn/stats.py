"""Federated normalization statistics for SmolVLA's state and action features, in and out of lerobot.

SmolVLA normalizes `observation.state` and `action` with MEAN_STD (visual features are IDENTITY), and the
statistics live in the pre/post processors, not in the weights. Every host's episodes have different
statistics, so the federation agrees on the statistics of the union of all hosts' frames: each host computes
`SufficientStats` (`zk0.learn.sufficient_stats`) from its own parquet frames with `from_dataset` (never images,
never frames leaving the host), the server `combine`s them exactly, and `to_lerobot_stats` turns the result
into the dict that lerobot's `NormalizerProcessorStep` / `UnnormalizerProcessorStep` and `dataset.meta.stats`
use; `with_stats` puts it into a policy's processors.

Quantiles (for users who switch a feature to QUANTILES / QUANTILE10 normalization) are read from the
statistics' fixed-bin histogram. A quantile read from it is exact up to one bin width when it falls inside the
histogram's range, and is clamped to the observed min/max otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from zk0.learn.sufficient_stats import FeatureStats, HistogramSpec, StatsMismatch, SufficientStats, from_arrays

if TYPE_CHECKING:
    from lerobot.processor import PolicyProcessorPipeline

QUANTILES: tuple[float, ...] = (0.01, 0.10, 0.50, 0.90, 0.99)  # lerobot's DEFAULT_QUANTILES


def _histogram_quantile(fs: FeatureStats, q: float) -> np.ndarray:
    """Per-dimension q-quantile from the histogram, linear within a bin, clamped to the observed range."""
    spec = fs.histogram
    assert spec is not None and fs.hist_counts is not None
    target = q * fs.count
    cumulative = np.cumsum(fs.hist_counts, axis=1)
    result = np.empty(fs.shape, dtype=np.float64)
    for dim, cum in enumerate(cumulative):
        column = int(np.searchsorted(cum, target, side="left"))
        before = cum[column - 1] if column > 0 else 0
        in_bin = cum[column] - before
        fraction = (target - before) / in_bin if in_bin else 0.0
        # Column c covers [low + (c-1)*w, low + c*w); under/overflow columns are clamped by min/max below.
        result[dim] = spec.low + (column - 1 + fraction) * spec.bin_width
    return np.clip(result, fs.min, fs.max)


def to_lerobot_stats(stats: SufficientStats) -> dict[str, dict[str, np.ndarray]]:
    """`{feature: {mean, std, min, max, count[, q01, q10, q50, q90, q99]}}` as lerobot's normalizers read it.

    `std` is the population standard deviation, as lerobot's `compute_stats` computes it.
    """
    out: dict[str, dict[str, np.ndarray]] = {}
    for name, fs in stats.features.items():
        if fs.count < 1:
            raise StatsMismatch(f"feature {name!r} has no frames")
        entry = {
            "mean": fs.mean.copy(),
            "std": np.sqrt(np.maximum(fs.m2 / fs.count, 0.0)),
            "min": fs.min.copy(),
            "max": fs.max.copy(),
            "count": np.array([fs.count], dtype=np.int64),
        }
        if fs.histogram is not None:
            for q in QUANTILES:
                entry[f"q{int(round(q * 100)):02d}"] = _histogram_quantile(fs, q)
        out[name] = entry
    return out


def _default_features(info: Mapping[str, Any]) -> list[str]:
    """The numeric observation/action vectors of a LeRobot dataset (what SmolVLA normalizes)."""
    return [
        name
        for name, spec in info["features"].items()
        if spec["dtype"] in ("float32", "float64") and (name == "action" or name.startswith("observation."))
    ]


def _column_to_array(column: Any, dims: int) -> np.ndarray:
    flat = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return np.asarray(flat, dtype=np.float64).reshape(-1, dims)


def from_dataset(
    root: str | Path,
    features: Sequence[str] | None = None,
    episodes: Iterable[int] | None = None,
    histogram: HistogramSpec | None = HistogramSpec(),
) -> SufficientStats:
    """Statistics of a LeRobot v3 dataset's frames, read from its parquet data (videos are never opened).

    `features` defaults to every float `observation.*` vector and `action`; `episodes` to all of them.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    root = Path(root)
    info_path = root / "meta" / "info.json"
    if not info_path.is_file():
        raise FileNotFoundError(f"{root} is not a LeRobot dataset: {info_path} is missing")
    info = json.loads(info_path.read_text())
    names = list(features) if features is not None else _default_features(info)
    for name in names:
        spec = info["features"].get(name)
        if spec is None:
            raise StatsMismatch(f"feature {name!r} is not in dataset {root}")
        if spec["dtype"] in ("image", "video"):
            raise StatsMismatch(f"feature {name!r} is visual; SmolVLA leaves visual features unnormalized")
    dims = {name: int(np.prod(info["features"][name]["shape"])) for name in names}
    wanted = None if episodes is None else sorted(set(episodes))

    chunks: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for path in sorted((root / "data").glob("**/*.parquet")):
        table = pq.read_table(path, columns=[*names, "episode_index"])
        if wanted is not None:
            table = table.filter(pc.is_in(table["episode_index"], value_set=_int_array(wanted)))
        for name in names:
            chunks[name].append(_column_to_array(table[name], dims[name]))
    frames = {name: np.concatenate(parts) if parts else np.empty((0, dims[name])) for name, parts in chunks.items()}
    empty = [name for name, values in frames.items() if len(values) == 0]
    if empty:
        raise ValueError(f"dataset {root} has no frames for the selected episodes")
    return from_arrays(frames, histogram)


def _int_array(values: Sequence[int]) -> Any:
    import pyarrow as pa

    return pa.array(values, type=pa.int64())


def with_stats(
    preprocessor: PolicyProcessorPipeline,
    postprocessor: PolicyProcessorPipeline,
    stats: SufficientStats,
) -> tuple[PolicyProcessorPipeline, PolicyProcessorPipeline]:
    """Copies of a policy's pre/post processors normalizing with `stats`.

    Features absent from `stats` (e.g. camera stats kept for IDENTITY-normalized images) keep their current
    statistics. Every feature a normalizer step normalizes must match the shape declared in its features,
    or `StatsMismatch` names it. The returned pipelines save these stats with `save_pretrained`, so each
    checkpoint carries the statistics it was trained with.
    """
    from lerobot.configs import FeatureType, NormalizationMode
    from lerobot.processor.normalize_processor import _NormalizationMixin, hotswap_stats

    new_stats = to_lerobot_stats(stats)
    pipelines = []
    for pipeline in (preprocessor, postprocessor):
        merged: dict[str, dict[str, Any]] = {}
        for step in pipeline.steps:
            if not isinstance(step, _NormalizationMixin):
                continue
            for name, ft in step.features.items():
                mode = step.norm_map.get(ft.type, NormalizationMode.IDENTITY)
                if name in new_stats and ft.type != FeatureType.VISUAL and mode != NormalizationMode.IDENTITY:
                    got = new_stats[name]["mean"].shape
                    if tuple(got) != (int(np.prod(ft.shape)),):
                        raise StatsMismatch(f"feature {name!r}: stats have shape {got}, policy expects {ft.shape}")
            merged.update(step.stats or {})
        merged.update(new_stats)
        pipelines.append(hotswap_stats(pipeline, merged))
    return pipelines[0], pipelines[1]
