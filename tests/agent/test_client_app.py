"""The ClientApp's fault-injection drills, each checked the way the server will see it (decoded with zk0.learn.codec,
statistics read back as the server reads them), and what every reply says about its node (name, dataset id)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import MessageType

from tests.agent.test_lease import NODE_ID, _context, federation, normal_scheduling  # noqa: F401 (fixtures)
from tests.server.flower_app import ListingGrid, pushed, serverapp_identity
from zk0.agent import client_app, node_work
from zk0.learn import codec
from zk0.learn.federation import DATASET_ID, NODE_NAME, QUERY_STATS, STATS_RECORD
from zk0.learn.sufficient_stats import StatsInvalid, SufficientStats, from_arrays


@pytest.fixture
def update() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(trained state, round's global) of two small tensors, the trained one a small step away."""
    generator = torch.Generator().manual_seed(0)
    global_state = {"a.weight": torch.randn(4, 3, generator=generator), "b.bias": torch.randn(5, generator=generator)}
    return {k: v + 1e-3 * torch.randn(v.shape, generator=generator) for k, v in global_state.items()}, global_state


def _distance(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(((state[k].double() - reference[k].double()) ** 2).sum()) for k in state))


@pytest.mark.parametrize("codec_name", ["fp32", "int8-delta"])
def test_honest_update_is_the_plain_encoding(update, codec_name: str) -> None:
    state, global_state = update
    assert node_work.encoded_update(state, global_state, codec_name) == codec.encode(state, codec_name, base=global_state)


def test_nan_and_hash_drills_break_the_payload(update) -> None:
    state, global_state = update
    with pytest.raises(codec.NonFinite):
        codec.decode(node_work.encoded_update(state, global_state, "fp32", "nan"), global_state)
    with pytest.raises(codec.ChecksumMismatch):
        codec.decode(node_work.encoded_update(state, global_state, "fp32", "hash"), global_state)


@pytest.mark.parametrize("codec_name", ["fp32", "int8-delta"])
def test_huge_norm_drill_is_a_valid_payload_far_from_the_global(update, codec_name: str) -> None:
    state, global_state = update
    decoded = codec.decode(node_work.encoded_update(state, global_state, codec_name, "huge-norm"), global_state)
    honest = codec.decode(codec.encode(state, codec_name, base=global_state), global_state)
    ratio = _distance(decoded, global_state) / _distance(honest, global_state)
    assert ratio == pytest.approx(node_work.HUGE_NORM_FACTOR, rel=1e-2)


@pytest.mark.parametrize("codec_name", ["fp32", "int8-delta-row"])
def test_stale_base_drill_is_a_delta_against_another_global(update, codec_name: str) -> None:
    state, global_state = update
    payload = node_work.encoded_update(state, global_state, codec_name, "stale-base")
    with pytest.raises(codec.LayoutMismatch, match="different global than this round's"):
        codec.decode(payload, global_state)
    # well formed otherwise: decoded against the global it was taken against, it is the trained state
    other = {k: v + 1e-3 for k, v in global_state.items()}
    decoded = codec.decode(payload, other)
    assert all(torch.allclose(decoded[k], state[k], atol=1e-4) for k in state)


def test_inflate_examples_drill_claims_a_thousand_times_the_examples() -> None:
    metrics = {"num-examples": 32, "steps": 8, "policy-loss": 0.5}
    assert node_work.inflate_examples(metrics) == {"num-examples": 32_000, "steps": 8, "policy-loss": 0.5}
    assert metrics["num-examples"] == 32


def test_stats_nan_drill_is_refused_by_the_server_reading(tmp_path: Path) -> None:
    frames = {"observation.state": np.random.default_rng(0).normal(size=(20, 6)), "action": np.ones((20, 6))}
    stats = from_arrays(frames)
    drilled = node_work.nan_stats(stats)
    assert drilled.count == stats.count and all(np.isnan(fs.mean).all() for fs in drilled.features.values())
    with pytest.raises(StatsInvalid):
        SufficientStats.from_record(drilled.to_record())


def test_unknown_drill_is_refused() -> None:
    assert client_app.drill(_context({})) == ""
    with pytest.raises(ValueError, match="drill must be one of nan, hash, stats-nan"):
        client_app.drill(_context({"drill": "fire"}))


def test_dataset_id_stays_when_a_dataset_is_copied(federation, tmp_path: Path) -> None:  # noqa: F811
    """The id derives from the datasets' stable ids (zk0.learn.data.dataset_stable_id), not from paths or mtimes."""
    root = federation[0]
    original = client_app.dataset_id([root])
    moved = tmp_path / "moved" / root.name
    shutil.copytree(root, moved)
    (moved / "meta" / "info.json").touch()
    assert client_app.dataset_id([moved]) == original


def test_query_reply_names_the_node_and_carries_the_stats_nan_drill(federation) -> None:  # noqa: F811
    root = federation[0]
    with serverapp_identity():
        msg = Message(RecordDict({"config": ConfigRecord({"query": QUERY_STATS})}), message_type=MessageType.QUERY,
                      dst_node_id=NODE_ID)
    honest = client_app.query(msg, _context({"dataset-roots": str(root), "node-name": "kitchen"}))
    drilled = client_app.query(msg, _context({"dataset-roots": str(root), "node-name": "drill-stats-nan",
                                              "drill": "stats-nan"}))
    assert dict(honest.content["info"]) == {NODE_NAME: "kitchen", DATASET_ID: client_app.dataset_id([root])}
    assert dict(drilled.content["info"]) == {NODE_NAME: "drill-stats-nan", DATASET_ID: client_app.dataset_id([root])}
    assert np.isfinite(honest.content[STATS_RECORD]["observation.state/mean"].numpy()).all()
    assert np.isnan(drilled.content[STATS_RECORD]["observation.state/mean"].numpy()).all()


@pytest.mark.parametrize("records, stored, left_out", [
    ({node_work.SERVER_METRICS_RECORD: MetricRecord({"eval/loss": 0.5, "train/accepted-updates": 2})},
     {"eval/loss": 0.5, "train/accepted-updates": 2.0}, []),
    ({node_work.SERVER_METRICS_RECORD: MetricRecord({"eval/loss": math.nan, "round/mu": -math.inf, "round/lr": 1e-4,
                                                     "eval/loss/shelf": [0.5, 0.6]})},
     {"round/lr": 1e-4}, ["eval/loss=nan is not a finite number", "round/mu=-inf is not a finite number",
                          "eval/loss/shelf=[0.5, 0.6] is not a finite number"]),
    ({}, {}, ["the message carries no 'server-metrics' metric record (a server older than this node)"]),
    ({node_work.SERVER_METRICS_RECORD: ConfigRecord({"eval/loss": "0.5"})}, {},  # not a metric record at all
     ["the message carries no 'server-metrics' metric record (a server older than this node)"]),
])
def test_the_servers_metrics_are_kept_where_they_are_finite_numbers(records, stored, left_out) -> None:
    assert node_work.received_server_metrics(RecordDict(records)) == (stored, left_out)


def test_evaluate_reply_names_the_node(federation, tmp_path: Path, normal_scheduling) -> None:  # noqa: F811
    root, strategy, arrays = federation
    with serverapp_identity():
        [msg] = pushed(strategy.configure_evaluate(1, arrays, ConfigRecord(), ListingGrid([NODE_ID])))
    reply = client_app.evaluate(msg, _context({"dataset-roots": str(root), "node-name": "kitchen",
                                               "policy-store": str(tmp_path / "policies")}))
    assert dict(reply.content["info"]) == {NODE_NAME: "kitchen", DATASET_ID: client_app.dataset_id([root])}
    assert reply.content.metric_records["metrics"]["num-examples"] > 0
    assert (tmp_path / "policies" / "versions" / "run1-round1").is_dir()  # see tests/agent/test_policy_store.py


def test_each_delivered_global_prunes_the_store_to_its_limits(federation, tmp_path: Path, normal_scheduling) -> None:  # noqa: F811
    """policy-keep 1 (agent config federation.keep_versions): round 1 became active on arrival, so it stays;
    of the later rounds only the newest does."""
    from zk0.agent.policy_store import PolicyStore

    root, strategy, arrays = federation
    config = {"dataset-roots": str(root), "policy-store": str(tmp_path / "policies"), "policy-keep": 1}
    for server_round in (1, 2, 3):
        with serverapp_identity():
            [msg] = pushed(strategy.configure_evaluate(server_round, arrays, ConfigRecord(), ListingGrid([NODE_ID])))
        client_app.evaluate(msg, _context(config))
    store = PolicyStore(tmp_path / "policies")
    assert [v.name for v in store.versions()] == ["run1-round1", "run1-round3"]
    assert store.state().active == "run1-round1"
