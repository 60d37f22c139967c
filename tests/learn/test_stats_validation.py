"""Statistics records from other hosts are untrusted: every malformed one is refused with `StatsInvalid`."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zk0.learn.federation import stats_from_record, stats_to_record
from zk0.learn.sufficient_stats import HistogramSpec, StatsInvalid, StatsMismatch, SufficientStats, from_arrays

SPEC = HistogramSpec(-10.0, 10.0, 8)


def _record() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    frames = {"action": rng.normal(size=(20, 3)), "observation.state": rng.normal(size=(20, 3))}
    return from_arrays(frames, SPEC).to_record()


def _with(**changes) -> dict[str, object]:
    """The valid record with `action/<field>` replaced (None removes it)."""
    record: dict[str, object] = dict(_record())
    for field, value in changes.items():
        if value is None:
            del record[f"action/{field}"]
        else:
            record[f"action/{field}"] = value
    return record


def _shifted_counts() -> np.ndarray:
    counts = _record()["action/hist_counts"].copy()
    counts[0, 1] += 1
    return counts


def _negative_counts() -> np.ndarray:
    counts = _record()["action/hist_counts"].copy()
    counts[0, 1] -= 21
    counts[0, 2] += 21
    return counts


FAULTS = {
    "nan mean": (_with(mean=np.array([np.nan, 0.0, 0.0])), "mean contains NaN"),
    "infinite max": (_with(max=np.array([np.inf, 5.0, 5.0])), "max contains NaN or infinity"),
    "zero count": (_with(count=np.array([0])), "count 0 is not positive"),
    "negative count": (_with(count=np.array([-3])), "count -3"),
    "negative m2": (_with(m2=np.array([-1.0, 1.0, 1.0])), "m2.*negative"),
    "min above max": (_with(min=np.array([9.0, 9.0, 9.0]), max=np.array([8.0, 8.0, 8.0])), "min exceeds max"),
    "mean outside range": (_with(mean=np.array([100.0, 0.0, 0.0])), "mean lies outside"),
    "missing field": (_with(m2=None), "lack m2"),
    "unknown field": (_with(median=np.zeros(3)), "unknown field 'median'"),
    "spec without counts": (_with(hist_counts=None), "hist_spec but not both"),
    "float count": (_with(count=np.array([20.0])), "count has dtype float64"),
    "integer mean": (_with(mean=np.zeros(3, dtype=np.int64)), "mean has dtype int64"),
    "text values": (_with(m2=np.array(["a", "b", "c"])), "has dtype <U1"),
    "object values": (_with(m2=[object(), None, 1]), "has dtype object"),
    "ragged values": (_with(m2=[[1.0], [1.0, 2.0]]), "is not an array"),
    "wrong shape": (_with(m2=np.zeros(4)), "m2 has shape \\(4,\\)"),
    "scalar mean": (_with(mean=np.float64(0.0)), "mean has shape \\(\\)"),
    "two counts": (_with(count=np.array([20, 20])), "count has shape"),
    "histogram sum": (_with(hist_counts=_shifted_counts()), "do not add up to count 20"),
    "negative bins": (_with(hist_counts=_negative_counts()), "histogram counts are negative"),
    "histogram range": (_with(hist_spec=np.array([5.0, -5.0, 8.0])), "low < high"),
    "fractional bins": (_with(hist_spec=np.array([-10.0, 10.0, 7.5])), "bin count 7.5"),
    "histogram shape": (_with(hist_counts=np.zeros((3, 9), np.int64)), "hist_counts has shape"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_each_fault_is_refused_naming_the_feature(fault):
    record, why = FAULTS[fault]
    with pytest.raises(StatsInvalid, match=why) as refused:
        SufficientStats.from_record(record)
    assert "'action'" in refused.value.reason and "\n" not in refused.value.reason
    assert isinstance(refused.value, StatsMismatch) and isinstance(refused.value, ValueError)


@pytest.mark.parametrize(
    ("record", "why"),
    [
        ({}, "no features"),
        ({"mean": np.zeros(3)}, "not '<feature>/<field>'"),
        ({3: np.zeros(3)}, "not a string"),
        ([("action/mean", np.zeros(3))], "not a mapping"),
        ({**_record(), "action/count": np.array([20]), "observation.state/count": np.array([21])}, "counts"),
    ],
)
def test_record_level_faults_are_refused(record, why):
    with pytest.raises(StatsInvalid, match=why):
        SufficientStats.from_record(record)


def test_flower_records_are_validated_too():
    from flwr.app import Array, ArrayRecord

    record = stats_to_record(SufficientStats.from_record(_record()))
    assert stats_from_record(record).count == 20
    bad = ArrayRecord({key: Array(np.ascontiguousarray(v)) for key, v in _with(m2=-np.ones(3)).items()})
    with pytest.raises(StatsInvalid, match="'action': m2"):
        stats_from_record(bad)


def _corrupt_value(draw, value: np.ndarray) -> object:
    kind = draw(st.sampled_from(["special", "scale", "dtype", "shape", "random", "object"]))
    array = np.array(value, copy=True)
    if kind == "special" and array.size:
        flat = array.astype(np.float64).reshape(-1)
        flat[draw(st.integers(0, flat.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf, -1.0, 0.0, 1e308]))
        return flat.reshape(array.shape).astype(draw(st.sampled_from([array.dtype, np.float64])))
    if kind == "scale":
        return array * np.asarray(draw(st.sampled_from([-1, 0, 2, -(2**40)])), dtype=np.int64)
    if kind == "dtype":
        return array.astype(draw(st.sampled_from([np.float32, np.int64, np.uint64, np.int8, np.bool_, np.float16])))
    if kind == "shape":
        return array.reshape(-1)[: draw(st.integers(0, max(array.size - 1, 0)))]
    if kind == "random":
        shape = draw(st.sampled_from([array.shape, (), (1,), (3,), (2, 2)]))
        return np.asarray(draw(st.lists(st.floats(allow_nan=True, allow_infinity=True),
                                        min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))).reshape(shape)
    return draw(st.sampled_from([None, "20", b"\x00", [1, [2]], 1.5, {"a": 1}]))


@st.composite
def corrupted_records(draw):
    record: dict[object, object] = dict(_record())
    for _ in range(draw(st.integers(1, 4))):
        keys = sorted(record, key=str)
        action = draw(st.sampled_from(["value", "value", "value", "drop", "add", "rename"] if keys else ["add"]))
        if action == "add":
            record[draw(st.sampled_from(["action/extra", "extra", "action/count", "x/mean", "/m2", 7]))] = np.zeros(3)
            continue
        key = draw(st.sampled_from(keys))
        if action == "value":
            value = record[key]
            numeric = isinstance(value, np.ndarray) and value.dtype.kind in "biuf"
            with np.errstate(all="ignore"):
                record[key] = _corrupt_value(draw, value) if numeric else np.zeros(3)
        elif action == "drop":
            del record[key]
        else:
            record[str(key).replace("action", "observation.state")] = record.pop(key)
    return record


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(corrupted_records())
def test_corrupted_records_parse_into_sane_stats_or_are_refused(record):
    try:
        stats = SufficientStats.from_record(record)
    except StatsInvalid as refused:
        assert refused.reason and "\n" not in refused.reason
        return
    assert stats.features and stats.count > 0
    for fs in stats.features.values():
        assert fs.count == stats.count
        for values in (fs.mean, fs.m2, fs.min, fs.max):
            assert values.dtype == np.float64 and values.shape == fs.shape and np.isfinite(values).all()
        assert (fs.m2 >= 0).all() and (fs.min <= fs.max).all()
        if fs.hist_counts is not None:
            assert (fs.hist_counts >= 0).all() and (fs.hist_counts.sum(axis=1) == fs.count).all()
