"""Sufficient statistics of vector features that combine exactly across hosts, and their wire record.

Per feature we keep count, mean and M2 (sum of squared deviations from the mean) in float64 rather than raw
sums of squares: combining with Chan et al.'s pairwise update avoids the catastrophic cancellation of
`E[x^2] - E[x]^2` when |mean| >> std (joint angles near +-90 deg with sub-degree spread).

Quantiles need a histogram over a fixed-bin range every host agrees on in advance (`HistogramSpec`), with one
underflow and one overflow bin so counts stay exact under `combine`. The default range covers SO-10x joints in
degrees and the gripper's 0..100.

Records from other hosts (`SufficientStats.from_record`) are untrusted and validated before use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_RECORD_FIELDS = ("count", "mean", "m2", "min", "max")
_HISTOGRAM_FIELDS = ("hist_spec", "hist_counts")


class StatsMismatch(ValueError):
    """Statistics that cannot be combined or applied: feature names, shapes or histogram ranges differ."""


class StatsInvalid(StatsMismatch):
    """A statistics record that real frames cannot have produced; `reason` names the feature and the fault.

    A subclass of `StatsMismatch` (so of `ValueError`): callers refusing mismatching statistics refuse
    these too.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class HistogramSpec:
    """Fixed histogram bins agreed by the whole federation before any host computes statistics."""

    low: float = -360.0
    high: float = 360.0
    bins: int = 2880  # 0.25 deg per bin over one full turn each way

    def __post_init__(self) -> None:
        if not (np.isfinite(self.low) and np.isfinite(self.high) and self.low < self.high):
            raise ValueError(f"histogram range must be finite with low < high, got [{self.low}, {self.high}]")
        if self.bins < 1:
            raise ValueError(f"histogram needs at least one bin, got {self.bins}")

    @property
    def bin_width(self) -> float:
        return (self.high - self.low) / self.bins

    def counts(self, values: np.ndarray) -> np.ndarray:
        """Per-dimension counts of `values` (N, D): (D, bins + 2), first/last column under/overflow."""
        scaled = np.floor((values - self.low) / self.bin_width).astype(np.int64)
        # Underflow lands in column 0, overflow in column bins + 1; `high` itself belongs to the last real bin.
        column = np.clip(scaled, -1, self.bins) + 1
        column[values == self.high] = self.bins
        dims = values.shape[1]
        flat = column + np.arange(dims, dtype=np.int64)[None, :] * (self.bins + 2)
        return np.bincount(flat.ravel(), minlength=dims * (self.bins + 2)).reshape(dims, self.bins + 2)


@dataclass(frozen=True)
class FeatureStats:
    """Sufficient statistics of one vector feature over `count` frames (all arrays float64 of shape (D,))."""

    count: int
    mean: np.ndarray
    m2: np.ndarray
    min: np.ndarray
    max: np.ndarray
    histogram: HistogramSpec | None = None
    hist_counts: np.ndarray | None = None  # int64 (D, bins + 2) when `histogram` is set

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.mean.shape)

    @classmethod
    def of(cls, values: np.ndarray, histogram: HistogramSpec | None = None) -> FeatureStats:
        """Statistics of the frames `values` (N, D)."""
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 2 or values.shape[0] == 0:
            raise ValueError(f"expected a non-empty (frames, dims) array, got shape {values.shape}")
        if not np.isfinite(values).all():
            raise ValueError("frames contain NaN or infinite values")
        mean = values.mean(axis=0)
        return cls(
            count=int(values.shape[0]),
            mean=mean,
            m2=((values - mean) ** 2).sum(axis=0),
            min=values.min(axis=0),
            max=values.max(axis=0),
            histogram=histogram,
            hist_counts=None if histogram is None else histogram.counts(values),
        )


@dataclass(frozen=True)
class SufficientStats:
    """Per-feature sufficient statistics of one host's (or the federation's) frames."""

    features: dict[str, FeatureStats] = field(default_factory=dict)

    @property
    def count(self) -> int:
        """Number of frames summarised (the same for every feature of one dataset)."""
        return max((f.count for f in self.features.values()), default=0)

    def to_record(self) -> dict[str, np.ndarray]:
        """Flat `{"<feature>/<field>": ndarray}` for a Flower ArrayRecord or `np.savez`."""
        record: dict[str, np.ndarray] = {}
        for name, fs in self.features.items():
            record[f"{name}/count"] = np.array([fs.count], dtype=np.int64)
            record[f"{name}/mean"] = fs.mean
            record[f"{name}/m2"] = fs.m2
            record[f"{name}/min"] = fs.min
            record[f"{name}/max"] = fs.max
            if fs.histogram is not None:
                spec = fs.histogram
                record[f"{name}/hist_spec"] = np.array([spec.low, spec.high, spec.bins], dtype=np.float64)
                record[f"{name}/hist_counts"] = fs.hist_counts
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, np.ndarray]) -> SufficientStats:
        """Inverse of `to_record`, for records sent by other hosts: untrusted until validated.

        Raises `StatsInvalid` (and nothing else) for any record `to_record` could not have produced from real
        frames: missing or unknown fields, wrong dtypes or shapes, non-finite values, count <= 0, negative
        M2, min > max, a mean outside [min, max], counts differing between features, or a histogram whose
        range is invalid or whose counts are negative or do not add up to the frame count. One poisoned
        record would otherwise corrupt the normalization of every participant.
        """
        if not isinstance(record, Mapping):
            raise StatsInvalid(f"stats record is a {type(record).__name__}, not a mapping")
        grouped: dict[str, dict[str, np.ndarray]] = {}
        for key, value in record.items():
            name, field_name = _split_key(key)
            grouped.setdefault(name, {})[field_name] = _as_array(name, field_name, value)
        if not grouped:
            raise StatsInvalid("stats record has no features")
        features = {name: _feature_from_fields(name, fields) for name, fields in grouped.items()}
        counts = {fs.count for fs in features.values()}
        if len(counts) > 1:
            raise StatsInvalid(f"stats record counts {sorted(counts)} frames for different features of one dataset")
        return cls(features)


def _split_key(key: Any) -> tuple[str, str]:
    if not isinstance(key, str):
        raise StatsInvalid(f"stats record key {key!r} is not a string")
    name, sep, field_name = key.rpartition("/")
    if not sep or not name:
        raise StatsInvalid(f"stats record key {key!r} is not '<feature>/<field>'")
    if field_name not in _RECORD_FIELDS + _HISTOGRAM_FIELDS:
        raise StatsInvalid(f"feature {name!r}: unknown field {field_name!r}")
    return name, field_name


def _as_array(name: str, field_name: str, value: Any) -> np.ndarray:
    try:
        array = np.asarray(value)
    except Exception as exc:  # untrusted input: ragged sequences, objects whose __array__ raises, ...
        raise StatsInvalid(f"feature {name!r}: {field_name} is not an array ({exc})") from None
    if array.dtype.kind not in "iuf":
        raise StatsInvalid(f"feature {name!r}: {field_name} has dtype {array.dtype}, expected a number type")
    return array


def _field(name: str, fields: Mapping[str, np.ndarray], field_name: str, kind: str,
           shape: tuple[int, ...]) -> np.ndarray:
    """`fields[field_name]` checked for number kind ('i': integer, 'f': float) and shape, as int64 / float64."""
    value = fields[field_name]
    if (kind == "i" and value.dtype.kind not in "iu") or (kind == "f" and value.dtype.kind != "f"):
        raise StatsInvalid(f"feature {name!r}: {field_name} has dtype {value.dtype}, expected "
                           f"{'an integer' if kind == 'i' else 'a float'} type")
    if value.shape != shape:
        raise StatsInvalid(f"feature {name!r}: {field_name} has shape {value.shape}, expected {shape}")
    if kind == "i":
        if value.dtype.kind == "u" and (value > np.iinfo(np.int64).max).any():
            raise StatsInvalid(f"feature {name!r}: {field_name} exceeds the int64 range")
        return value.astype(np.int64)
    converted = value.astype(np.float64)
    if not np.isfinite(converted).all():
        raise StatsInvalid(f"feature {name!r}: {field_name} contains NaN or infinity")
    return converted


def _feature_from_fields(name: str, fields: Mapping[str, np.ndarray]) -> FeatureStats:
    missing = [f for f in _RECORD_FIELDS if f not in fields]
    if missing:
        raise StatsInvalid(f"feature {name!r}: stats lack {', '.join(missing)}")
    mean_shape = fields["mean"].shape
    if len(mean_shape) != 1 or mean_shape[0] < 1:
        raise StatsInvalid(f"feature {name!r}: mean has shape {mean_shape}, expected (dims,) with dims >= 1")
    count = int(_field(name, fields, "count", "i", (1,))[0])
    if count < 1:
        raise StatsInvalid(f"feature {name!r}: count {count} is not positive")
    mean, m2, low, high = (_field(name, fields, f, "f", mean_shape) for f in ("mean", "m2", "min", "max"))
    if (m2 < 0).any():
        raise StatsInvalid(f"feature {name!r}: m2 (sum of squared deviations) is negative")
    if (low > high).any():
        raise StatsInvalid(f"feature {name!r}: min exceeds max")
    # The mean of float64 frames may exceed their range by rounding only (a few ulps).
    slack = 1e-9 * (np.abs(low) + np.abs(high)) + 1e-300
    if ((mean < low - slack) | (mean > high + slack)).any():
        raise StatsInvalid(f"feature {name!r}: mean lies outside [min, max]")
    histogram, hist_counts = _histogram_from_fields(name, fields, mean_shape[0], count)
    return FeatureStats(count=count, mean=mean, m2=m2, min=low, max=high, histogram=histogram,
                        hist_counts=hist_counts)


def _histogram_from_fields(name: str, fields: Mapping[str, np.ndarray], dims: int,
                           count: int) -> tuple[HistogramSpec | None, np.ndarray | None]:
    present = [f for f in _HISTOGRAM_FIELDS if f in fields]
    if not present:
        return None, None
    if len(present) == 1:
        raise StatsInvalid(f"feature {name!r}: has {present[0]} but not both of {', '.join(_HISTOGRAM_FIELDS)}")
    low, high, bins = _field(name, fields, "hist_spec", "f", (3,)).tolist()
    if bins != int(bins) or bins < 1:
        raise StatsInvalid(f"feature {name!r}: histogram bin count {bins} is not a positive integer")
    try:
        histogram = HistogramSpec(low, high, int(bins))
    except ValueError as exc:
        raise StatsInvalid(f"feature {name!r}: {exc}") from None
    hist_counts = _field(name, fields, "hist_counts", "i", (dims, histogram.bins + 2))
    if (hist_counts < 0).any():
        raise StatsInvalid(f"feature {name!r}: histogram counts are negative")
    if (hist_counts.sum(axis=1, dtype=np.float64) != count).any():
        raise StatsInvalid(f"feature {name!r}: histogram counts do not add up to count {count}")
    return histogram, hist_counts


def from_arrays(frames: Mapping[str, np.ndarray], histogram: HistogramSpec | None = HistogramSpec()) -> SufficientStats:
    """Statistics of in-memory frames, `{feature: (N, D) array}`."""
    return SufficientStats({name: FeatureStats.of(values, histogram) for name, values in frames.items()})


def _combine_pair(a: FeatureStats, b: FeatureStats) -> FeatureStats:
    n = a.count + b.count
    delta = b.mean - a.mean
    return FeatureStats(
        count=n,
        mean=a.mean + delta * (b.count / n),
        m2=a.m2 + b.m2 + delta**2 * (a.count * b.count / n),
        min=np.minimum(a.min, b.min),
        max=np.maximum(a.max, b.max),
        histogram=a.histogram,
        hist_counts=None if a.hist_counts is None else a.hist_counts + b.hist_counts,
    )


def _check_compatible(name: str, first: FeatureStats, other: FeatureStats) -> None:
    if other.shape != first.shape:
        raise StatsMismatch(f"feature {name!r} has shape {other.shape} on one host and {first.shape} on another")
    if other.histogram != first.histogram:
        raise StatsMismatch(
            f"feature {name!r} uses histogram {other.histogram} on one host and {first.histogram} on another"
        )


def combine(stats: Sequence[SufficientStats]) -> SufficientStats:
    """Statistics of the union of the frames behind `stats` (exact up to float64 rounding).

    Every part must describe the same features with the same shapes and histogram bins; anything else is
    refused with `StatsMismatch` naming the feature, because normalizing with statistics of a different
    feature layout silently corrupts every action.
    """
    if not stats:
        raise ValueError("combine needs at least one set of statistics")
    names = set(stats[0].features)
    for part in stats[1:]:
        if set(part.features) != names:
            differing = sorted(names.symmetric_difference(part.features))
            raise StatsMismatch(f"feature {differing[0]!r} is present on some hosts but not others")
    combined: dict[str, FeatureStats] = {}
    for name in stats[0].features:
        total = stats[0].features[name]
        for part in stats[1:]:
            _check_compatible(name, total, part.features[name])
            total = _combine_pair(total, part.features[name])
        combined[name] = total
    return SufficientStats(combined)
