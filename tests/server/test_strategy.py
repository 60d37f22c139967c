"""Update validation and robust aggregation over real zk0 payloads and Flower messages."""

import hashlib
import struct
import time

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.app.message.message import make_message

from tests.server.flower_app import ListingGrid, pushed, serverapp_identity
from zk0.learn import codec
from zk0.learn.federation import DECLINED, INFO_RECORD, METRICS_RECORD, PREEMPTED, UPDATE_RECORD
from zk0.server.config import ValidationConfig
from zk0.server.run_dir import outcome_summary
from zk0.server.schedule import ScheduleConfig
from zk0.server.strategy import (
    Outcome,
    UpdateRejected,
    Zk0FedProx,
    aggregate_states,
    sample_nodes,
    validate_update,
)

GLOBAL = {"expert.w": torch.zeros(4, 3), "proj.b": torch.zeros(5)}


def _state(value: float) -> dict[str, torch.Tensor]:
    return {k: torch.full_like(v, value) for k, v in GLOBAL.items()}


def _nan_payload() -> bytes:
    """A correctly framed and checksummed fp32 payload whose values are NaN (a node past its own checks)."""
    good = bytearray(codec.encode(_state(1.0), "fp32"))
    body_end = len(good) - 32
    struct.pack_into("<f", good, body_end - 4, float("nan"))
    good[body_end:] = hashlib.sha256(bytes(good[:body_end])).digest()
    return bytes(good)


def _tampered_payload() -> bytes:
    payload = bytearray(codec.encode(_state(1.0), "fp32"))
    payload[-40] ^= 0xFF  # a body byte; the carried SHA-256 no longer matches
    return bytes(payload)


def test_valid_update_decodes():
    update = validate_update(codec.encode(_state(0.5), "fp32"), GLOBAL, max_norm=None)
    assert torch.equal(update["proj.b"], torch.full((5,), 0.5))


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (_nan_payload(), "NaN or infinity"),
        (_tampered_payload(), "SHA-256 does not match"),
        (codec.encode({"expert.w": torch.zeros(4, 3)}, "fp32"), "keys differ"),
        (codec.encode({"expert.w": torch.zeros(3, 4), "proj.b": torch.zeros(5)}, "fp32"), "has shape"),
        (codec.encode(_state(1.0), "int8-delta", base=_state(0.1)), "different global"),
        (b"garbage", "too short"),
    ],
)
def test_bad_updates_are_rejected_with_reason(payload, reason):
    with pytest.raises(UpdateRejected, match=reason):
        validate_update(payload, GLOBAL, max_norm=None)


def test_norm_bound():
    payload = codec.encode(_state(1.0), "fp32")  # distance sqrt(17)
    assert validate_update(payload, GLOBAL, max_norm=4.2)
    with pytest.raises(UpdateRejected, match="above the bound 4"):
        validate_update(payload, GLOBAL, max_norm=4.0)


def test_weighted_mean_trimmed_mean_and_median():
    updates = [_state(v) for v in (1.0, 2.0, 3.0, 100.0)]
    mean = aggregate_states(updates, [1, 1, 1, 1], "fedavg")
    assert mean["proj.b"][0].item() == pytest.approx(26.5)
    weighted = aggregate_states(updates[:2], [3, 1], "fedavg")
    assert weighted["proj.b"][0].item() == pytest.approx(1.25)
    trimmed = aggregate_states(updates, [1, 1, 1, 1], "trimmed-mean", trim_fraction=0.25)
    assert trimmed["expert.w"][0, 0].item() == pytest.approx(2.5)  # 1 and 100 trimmed
    median = aggregate_states(updates, [1, 1, 1, 1000], "median")  # weights cannot buy the median
    assert median["proj.b"][0].item() == pytest.approx(2.5)
    assert aggregate_states(updates[:3], [1, 1, 1], "median")["proj.b"][0].item() == 2.0


def _reply(node_id: int, payload: bytes, examples: int, loss: float) -> object:
    metadata = Metadata(run_id=1, message_id=f"m{node_id}", src_node_id=node_id, dst_node_id=0,
                        reply_to_message_id="x", group_id="1", created_at=time.time(), ttl=60, message_type="train")
    content = RecordDict({
        UPDATE_RECORD: codec.to_array_record(payload),
        METRICS_RECORD: MetricRecord({"num-examples": examples, "policy-loss": loss, "loss-std": 0.1}),
        "info": ConfigRecord({"dataset-id": f"ds{node_id}"}),
    })
    return make_message(metadata, content)


def test_round_completes_without_the_bad_node_and_records_why(caplog):
    strategy = Zk0FedProx(ScheduleConfig(), ValidationConfig(), {"local-steps": 1}, min_nodes=2)
    strategy.start_round(1, ArrayRecord(GLOBAL))
    replies = [
        _reply(1, codec.encode(_state(1.0), "fp32"), 10, 0.5),
        _reply(2, codec.encode(_state(3.0), "fp32"), 30, 1.5),
        _reply(3, _nan_payload(), 10, 0.1),
    ]
    with caplog.at_level("WARNING", logger="zk0.server"):
        arrays, metrics = strategy.aggregate_train(1, replies)
    state = arrays.to_torch_state_dict()
    assert state["proj.b"][0].item() == pytest.approx(2.5)  # (1*10 + 3*30) / 40, node 3 left out
    assert metrics["accepted-updates"] == 2
    assert metrics["policy-loss"] == pytest.approx((0.5 * 10 + 1.5 * 30) / 40)
    bad = strategy.current.clients[3]
    assert bad.outcome == Outcome.REJECTED and "NaN" in bad.reason
    assert "rejected update from node 3" in caplog.text


def test_unstable_client_gets_raised_mu_next_round():
    strategy = Zk0FedProx(ScheduleConfig(base_mu=0.005), ValidationConfig(), {}, min_nodes=1)
    strategy.start_round(1, ArrayRecord(GLOBAL))
    reply = _reply(4, codec.encode(_state(1.0), "fp32"), 10, 0.5)
    reply.content.metric_records[METRICS_RECORD]["loss-std"] = 1.5
    strategy.aggregate_train(1, [reply])
    strategy.start_round(2, ArrayRecord(GLOBAL))
    assert strategy.client_mu(4) == pytest.approx(0.02)
    assert strategy.client_mu(99) == pytest.approx(0.005 * 0.98)


def test_delta_codec_updates_are_decoded_against_the_round_global():
    strategy = Zk0FedProx(ScheduleConfig(), ValidationConfig(aggregation="median"), {}, min_nodes=1)
    strategy.start_round(1, ArrayRecord(_state(0.5)))
    replies = [_reply(n, codec.encode(_state(v), "int8-delta-row", base=_state(0.5)), 10, 1.0)
               for n, v in ((1, 1.0), (2, 2.0), (3, 50.0))]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["accepted-updates"] == 3
    assert arrays.to_torch_state_dict()["proj.b"][0].item() == pytest.approx(2.0, abs=0.2)  # the outlier is out


def _declined(node_id: int, reason: str) -> object:
    metadata = Metadata(run_id=1, message_id=f"m{node_id}", src_node_id=node_id, dst_node_id=0,
                        reply_to_message_id="x", group_id="1", created_at=time.time(), ttl=60, message_type="train")
    return make_message(metadata, RecordDict({INFO_RECORD: ConfigRecord({DECLINED: reason})}))


def test_a_declined_round_is_recorded_not_rejected_and_the_rest_aggregate(caplog):
    strategy = Zk0FedProx(ScheduleConfig(), ValidationConfig(), {"local-steps": 8}, min_nodes=2)
    strategy.start_round(1, ArrayRecord(GLOBAL))
    replies = [_reply(1, codec.encode(_state(1.0), "fp32"), 10, 0.5),
               _declined(2, "training lease refused: recording in progress")]
    with caplog.at_level("INFO", logger="zk0.server"):
        arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays.to_torch_state_dict()["proj.b"][0].item() == pytest.approx(1.0)
    assert metrics["accepted-updates"] == 1
    declined = strategy.current.clients[2]
    assert declined.outcome == Outcome.DECLINED and declined.reason == "training lease refused: recording in progress"
    assert "node 2 declined to train: training lease refused: recording in progress" in caplog.text
    assert "rejected" not in caplog.text
    # every node declining leaves the global unchanged, as a round without any valid update does
    strategy.start_round(2, ArrayRecord(GLOBAL))
    assert strategy.aggregate_train(2, [_declined(1, "outside training hours"), _declined(2, "busy")]) == (None, None)


def test_a_partial_update_from_a_preempted_node_is_aggregated_by_its_examples():
    strategy = Zk0FedProx(ScheduleConfig(), ValidationConfig(), {"local-steps": 8}, min_nodes=2)
    strategy.start_round(1, ArrayRecord(GLOBAL))
    partial = _reply(2, codec.encode(_state(3.0), "fp32"), 10, 1.5)
    partial.content.metric_records[METRICS_RECORD]["steps"] = 2
    partial.content.config_records[INFO_RECORD][PREEMPTED] = "lease revoked by the agent: recording in progress"
    arrays, _ = strategy.aggregate_train(1, [_reply(1, codec.encode(_state(1.0), "fp32"), 30, 0.5), partial])
    assert arrays.to_torch_state_dict()["proj.b"][0].item() == pytest.approx((1 * 30 + 3 * 10) / 40)
    client = strategy.current.clients[2]
    assert client.accepted
    assert client.reason == "partial update (2 steps): lease revoked by the agent: recording in progress"


def test_a_lost_node_is_named_by_the_message_it_was_sent_and_a_silent_one_is_recorded(caplog):
    """Flower answers for a node whose heartbeats stopped with an error reply from the SuperLink itself, so
    the node is found through the message the reply refers to; a node that never answers is recorded too."""
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

    strategy = Zk0FedProx(ScheduleConfig(), ValidationConfig(), {"local-steps": 8}, min_nodes=2)
    with serverapp_identity():
        sent = pushed(strategy.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord(), ListingGrid([10, 11, 12, 13])))
    by_node = {m.metadata.dst_node_id: m for m in sent}
    good = [Message(RecordDict({UPDATE_RECORD: codec.to_array_record(codec.encode(_state(v), "fp32")),
                                METRICS_RECORD: MetricRecord({"num-examples": 10, "policy-loss": 0.5})}),
                    reply_to=by_node[n]) for n, v in ((10, 1.0), (11, 3.0))]
    lost = create_message_error_unavailable_res_message(by_node[12].metadata, "node_unavail")
    assert lost.metadata.src_node_id not in by_node  # the SuperLink's own id
    with caplog.at_level("WARNING", logger="zk0.server"):
        arrays, metrics = strategy.aggregate_train(1, [*good, lost])
    assert metrics["accepted-updates"] == 2
    assert arrays.to_torch_state_dict()["proj.b"][0].item() == pytest.approx(2.0)
    clients = strategy.current.clients
    assert sorted(clients) == [10, 11, 12, 13]
    assert clients[12].outcome == Outcome.LOST and "Node Unavailable" in clients[12].reason
    assert clients[13].outcome == Outcome.NO_REPLY
    assert "node 12 lost, the round goes on without it" in caplog.text
    assert "no reply from node 13 within the round timeout" in caplog.text
    assert outcome_summary([c.outcome for c in clients.values()]) == "2/4 updates accepted, 1 lost, 1 no reply"


def test_nodes_are_counted_and_sampled_from_one_listing():
    """A node dropping out between two listings must not leave the server waiting for a count that is gone."""
    grid = ListingGrid([1, 2, 3], [1, 2])
    assert sorted(sample_nodes(grid, min_available=2, fraction=1.0, min_sampled=2)) == [1, 2, 3]
    assert sorted(sample_nodes(ListingGrid([1, 2, 3, 4]), 2, 0.5, 1)) in ([1, 2], [1, 3], [1, 4], [2, 3], [2, 4], [3, 4])
