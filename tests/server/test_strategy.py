"""Update validation and robust aggregation over real zk0 payloads and Flower messages."""

import hashlib
import json
import math
import struct
import time

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.app.message.message import make_message

from tests.server.flower_app import FakeClock, ListingGrid, pushed, serverapp_identity
from zk0.learn import codec
from zk0.learn.federation import (
    DATASET_ID, DECLINED, INFO_RECORD, METRICS_RECORD, NODE_NAME, PREEMPTED, UPDATE_RECORD,
)
from zk0.learn.records import SERVER_METRICS_RECORD
from zk0.server.config import ValidationConfig
from zk0.server.evaluation import server_metrics
from zk0.server.run_dir import outcome_summary
from zk0.server.schedule import ScheduleConfig, ScheduleState
from zk0.server.aggregation import (
    UpdateRejected, aggregate_states, decode_update, example_weight, norm_rejections, trim_per_side, update_steps,
)
from zk0.server.node_wait import FederationAborted, WaitVerdict, node_wait_verdict, sample_nodes, wait_for_nodes
from zk0.server.strategy import FederationHistory, Outcome, Zk0FedProx

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
    update = decode_update(codec.encode(_state(0.5), "fp32"), GLOBAL)
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
        decode_update(payload, GLOBAL)


SQRT17 = math.sqrt(17)  # the distance of _state(1.0) from GLOBAL


@pytest.mark.parametrize(
    ("distances", "multiple", "max_norm", "previous", "reference", "rejected"),
    [
        ([SQRT17], None, 4.2, None, None, {}),  # the absolute bound alone
        ([SQRT17], None, 4.0, None, None, {0: "above the bound 4"}),
        # two nodes: the lower median is the reference, so the huge update cannot raise its own bound
        ([1.0, 1e4], 10, None, None, 1.0, {1: "1e+04 from the global (L2), above 10 x the round's reference 1 = 10"}),
        ([2.0, 3.0, 1.0, 1e4], 10, None, None, 2.0, {3: "above 10 x the round's reference 2 = 20"}),
        ([1.0, 9.9, 10.1], 10, None, None, 9.9, {}),  # a bound of 10x the median lets honest spread through
        ([5.0], 10, None, 0.1, 0.1, {0: "above 10 x the round's reference 0.1 = 1"}),  # one update: last round's
        ([5.0], 10, None, None, None, {}),  # one update, no history: no relative reference, accepted
        ([1.0, 1e4], None, None, None, 1.0, {}),  # relative bound off
        ([0.0, 0.0, 3.0], 10, None, None, 0.0, {}),  # a zero reference bounds nothing
        ([1.0, 50.0], 100, 20.0, None, 1.0, {1: "above the bound 20"}),  # the absolute bound stays an extra one
    ],
)
def test_norm_bound_is_relative_to_the_round(distances, multiple, max_norm, previous, reference, rejected):
    got_reference, reasons = norm_rejections(distances, multiple, max_norm, previous)
    assert got_reference == reference
    assert [i for i, r in enumerate(reasons) if r] == sorted(rejected)
    for i, text in rejected.items():
        assert text in reasons[i]


@pytest.mark.parametrize(
    ("n", "fraction", "cut"),
    [(1, 0.2, 0), (2, 0.2, 0), (3, 0.2, 1), (4, 0.2, 1), (5, 0.2, 1), (9, 0.2, 1), (10, 0.2, 2), (10, 0.45, 4)],
)
def test_trimmed_mean_trims_at_least_one_per_side_from_three_updates(n, fraction, cut):
    assert trim_per_side(n, fraction) == cut


def test_trimmed_mean_of_three_drops_the_outlier():
    trimmed = aggregate_states([_state(v) for v in (1.0, 2.0, 100.0)], [1, 1, 1], "trimmed-mean")
    assert trimmed["proj.b"][0].item() == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("claimed", "cap", "weight", "note"),
    [
        (10.0, 400, 10.0, ""),
        (400.0, 400, 400.0, ""),
        (400_000.0, 400, 400.0, "claimed 400000 examples, weighted as 400 (local-steps x batch-size)"),
        (10.0, None, 10.0, ""),  # the round's budget unknown: taken as claimed
    ],
)
def test_example_weight_is_capped_by_the_round_budget(claimed, cap, weight, note):
    assert example_weight(claimed, cap) == (weight, note)


@pytest.mark.parametrize("claimed", [None, 0.0, -5.0, math.nan, math.inf])
def test_an_impossible_example_count_is_rejected(claimed):
    with pytest.raises(UpdateRejected, match="not a positive number"):
        example_weight(claimed, 400)


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
    # the relative norm bound would refuse the outlier first; the median rule is what is under test here
    strategy = Zk0FedProx(ScheduleConfig(), ValidationConfig(aggregation="median", norm_bound_multiple=None), {},
                          min_nodes=1)
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
    assert sorted(sample_nodes(grid, min_available=2, fraction=1.0, min_sampled=2, timeout_s=60)) == [1, 2, 3]
    assert sorted(sample_nodes(ListingGrid([1, 2, 3, 4]), 2, 0.5, 1, 60)) in (
        [1, 2], [1, 3], [1, 4], [2, 3], [2, 4], [3, 4])


def _named_reply(node_id: int, value: float, examples: int = 10, name: str = "", dataset: str = "") -> object:
    reply = _reply(node_id, codec.encode(_state(value), "fp32"), examples, 0.5)
    info = reply.content.config_records[INFO_RECORD]
    info[DATASET_ID] = dataset or f"ds{node_id}"
    if name:
        info[NODE_NAME] = name
    return reply


def test_an_inflated_example_count_is_capped_by_what_the_round_asked_for(caplog):
    """The `inflate-examples` drill: a node claiming 1000x its examples weighs no more than the round's budget."""
    strategy = Zk0FedProx(ScheduleConfig(), ValidationConfig(), {"local-steps": 5, "batch-size": 2}, min_nodes=2)
    strategy.start_round(1, ArrayRecord(GLOBAL))
    with caplog.at_level("INFO", logger="zk0.server"):
        arrays, metrics = strategy.aggregate_train(1, [_named_reply(1, 1.0, 10), _named_reply(2, 3.0, 10_000, "arm2")])
    assert arrays.to_torch_state_dict()["proj.b"][0].item() == pytest.approx(2.0)  # (1*10 + 3*10) / 20
    assert metrics["num-examples"] == 20
    inflated = strategy.current.clients[2]
    assert inflated.accepted and inflated.reason == "claimed 10000 examples, weighted as 10 (local-steps x batch-size)"
    assert "node 2 (arm2) accepted: claimed 10000 examples, weighted as 10" in caplog.text
    assert strategy.current.clients[1].reason == ""


def test_a_huge_update_is_refused_against_the_round_and_a_lone_one_against_the_last_round(caplog):
    """The `huge-norm` drill: x1e4 the delta, with two nodes and, next round, alone."""
    strategy = Zk0FedProx(ScheduleConfig(), ValidationConfig(), {}, min_nodes=1)
    strategy.start_round(1, ArrayRecord(GLOBAL))
    with caplog.at_level("WARNING", logger="zk0.server"):
        arrays, metrics = strategy.aggregate_train(1, [_named_reply(1, 1.0), _named_reply(2, 1e4)])
    assert metrics["accepted-updates"] == 1 and arrays.to_torch_state_dict()["proj.b"][0].item() == pytest.approx(1.0)
    huge = strategy.current.clients[2]
    assert huge.outcome == Outcome.REJECTED
    assert huge.reason == (f"update is {1e4 * SQRT17:.4g} from the global (L2), above 10 x the round's reference "
                           f"{SQRT17:.4g} = {10 * SQRT17:.4g}")
    assert "rejected update from node 2: update is 4.123e+04" in caplog.text
    lr1 = strategy.current.schedule.lr
    assert strategy.history.update_norm_per_lr_step == pytest.approx(SQRT17 / lr1)  # one step each: no metric
    lr2 = strategy.start_round(2, ArrayRecord(GLOBAL)).schedule.lr
    assert strategy.aggregate_train(2, [_named_reply(2, 1e4)]) == (None, None)
    reference = SQRT17 * lr2 / lr1  # last round's median distance, scaled by the LR change
    expected = f"above 10 x the round's reference {reference:.4g} = {10 * reference:.4g}"
    assert expected in strategy.current.clients[2].reason
    # a lone update without any history has no reference to be judged by
    fresh = Zk0FedProx(ScheduleConfig(), ValidationConfig(), {}, min_nodes=1)
    fresh.start_round(1, ArrayRecord(GLOBAL))
    assert fresh.aggregate_train(1, [_named_reply(2, 1e4)])[1]["accepted-updates"] == 1


@pytest.mark.parametrize("claimed, asked, expected", [
    (3, 8, 3.0),          # a partial update stands for the steps it did
    (8, 8, 8.0),
    (5000, 8, 8.0),       # never more than the round asked for: a node cannot widen its own bound
    (None, 8, 8.0), (float("nan"), 8, 8.0), (0, 8, 8.0), (-2, 8, 8.0),
    (30, None, 30.0),     # the round's ask unknown: the claim
    (None, None, 1.0),
])
def test_the_steps_an_update_stands_for(claimed, asked, expected):
    assert update_steps(claimed, asked) == expected


def test_a_lone_update_is_judged_per_step_so_a_longer_honest_round_passes_and_a_huge_one_does_not():
    """Round 1: two nodes of 3 steps. Round 2: one node alone, 30 steps (e.g. the round asked for more and its
    lease was revoked part way): ~10x the distance of round 1, honest; scaled x1e4, refused."""
    strategy = Zk0FedProx(ScheduleConfig(), ValidationConfig(), {"local-steps": 100}, min_nodes=1)
    strategy.start_round(1, ArrayRecord(GLOBAL))
    first = [_named_reply(1, 1.0), _named_reply(2, 1.0)]
    for reply in first:
        reply.content.metric_records[METRICS_RECORD]["steps"] = 3
    strategy.aggregate_train(1, first)
    lr1 = strategy.current.schedule.lr
    assert strategy.history.update_norm_per_lr_step == pytest.approx(SQRT17 / (lr1 * 3))

    lr2 = strategy.start_round(2, ArrayRecord(GLOBAL)).schedule.lr
    longer = _named_reply(1, 10.0 * lr2 / lr1)
    longer.content.metric_records[METRICS_RECORD]["steps"] = 30
    assert strategy.aggregate_train(2, [longer])[1]["accepted-updates"] == 1

    strategy.start_round(3, ArrayRecord(GLOBAL))
    huge = _named_reply(1, 1e4)
    huge.content.metric_records[METRICS_RECORD]["steps"] = 5000  # claims more steps than asked: capped at 100
    assert strategy.aggregate_train(3, [huge]) == (None, None)
    assert "above 10 x the round's reference" in strategy.current.clients[1].reason


def test_trimmed_mean_of_two_updates_is_their_mean_with_a_warning(caplog):
    strategy = Zk0FedProx(ScheduleConfig(), ValidationConfig(aggregation="trimmed-mean"), {}, min_nodes=1)
    strategy.start_round(1, ArrayRecord(GLOBAL))
    with caplog.at_level("WARNING", logger="zk0.server"):
        arrays, _ = strategy.aggregate_train(1, [_named_reply(1, 1.0, 10), _named_reply(2, 2.0, 30)])
    assert arrays.to_torch_state_dict()["proj.b"][0].item() == pytest.approx(1.5)  # unweighted
    assert "round 1: 2 accepted updates, too few to trim: plain mean" in caplog.text


def test_history_round_trips_through_json():
    history = FederationHistory(
        eval_losses=[1.5, 1.2], schedule_state=ScheduleState(lr_scale=1.15, boost_round=9),
        client_loss_std={"dsA": 1.5}, dataset_of_node={4: "dsA", 7: "dsB"}, node_names={4: "arm1"},
        update_norm_per_lr_step=3.25e4,
    )
    assert FederationHistory.from_json(json.loads(json.dumps(history.to_json()))) == history
    assert FederationHistory.from_json({}) == FederationHistory()


def test_a_resumed_server_keeps_each_nodes_dataset_name_and_raised_mu():
    """Learned from the replies before a restart; after it, from the saved history only."""
    strategy = Zk0FedProx(ScheduleConfig(base_mu=0.005), ValidationConfig(), {}, min_nodes=1)
    strategy.start_round(1, ArrayRecord(GLOBAL))
    unstable = _named_reply(4, 1.0, name="arm4", dataset="dsA")
    unstable.content.metric_records[METRICS_RECORD]["loss-std"] = 1.5
    strategy.aggregate_train(1, [unstable, _named_reply(5, 1.0)])
    assert strategy.current.clients[4].name == "arm4"
    saved = json.loads(json.dumps(strategy.history.to_json()))

    resumed = Zk0FedProx(ScheduleConfig(base_mu=0.005), ValidationConfig(), {}, FederationHistory.from_json(saved),
                         min_nodes=1)
    with serverapp_identity():
        resumed.configure_train(2, ArrayRecord(GLOBAL), ConfigRecord(), ListingGrid([4, 5]))
    assert resumed.client_mu(4) == pytest.approx(0.02)
    assert resumed.client_mu(5) == pytest.approx(0.005 * 0.98)
    assert resumed.current.clients[4].name == "arm4" and resumed.current.clients[4].mu == pytest.approx(0.02)
    assert resumed.history.update_norm_per_lr_step == pytest.approx(SQRT17 / 1e-4)


def test_evaluate_replies_teach_the_server_node_names_and_datasets():
    strategy = Zk0FedProx(ScheduleConfig(), ValidationConfig(), {}, min_nodes=1)
    metadata = Metadata(run_id=1, message_id="e9", src_node_id=9, dst_node_id=0, reply_to_message_id="x",
                        group_id="1", created_at=time.time(), ttl=60, message_type="evaluate")
    reply = make_message(metadata, RecordDict({
        METRICS_RECORD: MetricRecord({"num-examples": 4, "eval-loss": 0.5}),
        INFO_RECORD: ConfigRecord({DATASET_ID: "dsE", NODE_NAME: "arm9"}),
    }))
    strategy.aggregate_evaluate(1, [reply])
    assert (strategy.history.dataset_of_node, strategy.history.node_names) == ({9: "dsE"}, {9: "arm9"})


@pytest.mark.parametrize(
    ("connected", "waited", "verdict"),
    [(2, 0.0, WaitVerdict.READY), (3, 5000.0, WaitVerdict.READY), (1, 0.0, WaitVerdict.WAIT),
     (1, 99.9, WaitVerdict.WAIT), (1, 100.0, WaitVerdict.TIMED_OUT), (0, 250.0, WaitVerdict.TIMED_OUT)],
)
def test_node_wait_verdict(connected, waited, verdict):
    assert node_wait_verdict(connected, 2, waited, timeout_s=100.0) == verdict


def test_waiting_for_nodes_proceeds_once_enough_connect_and_logs_every_30_s(caplog):
    clock = FakeClock()
    grid = ListingGrid(*[[1]] * 65, [1, 2, 3])  # a second and third node connect after 65 s
    with caplog.at_level("INFO", logger="zk0.server"):
        nodes = wait_for_nodes(grid, 2, timeout_s=100.0, clock=clock, sleep=clock.sleep)
    assert nodes == [1, 2, 3] and clock.now == 65.0
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["waiting for nodes: 1 connected, 2 needed (0 s of 100 s)",
                     "waiting for nodes: 1 connected, 2 needed (30 s of 100 s)",
                     "waiting for nodes: 1 connected, 2 needed (60 s of 100 s)"]


def test_a_lost_node_ends_the_wait_after_the_round_timeout(caplog):
    clock = FakeClock()
    with caplog.at_level("INFO", logger="zk0.server"), pytest.raises(FederationAborted) as info:
        wait_for_nodes(ListingGrid([1]), 2, timeout_s=100.0, clock=clock, sleep=clock.sleep)
    assert info.value.reason == "1 nodes connected, 2 needed: gave up after waiting 100 s (nodes.round_timeout_s)"
    assert len(caplog.records) == 4  # at 0, 30, 60 and 90 s, not every second


def test_a_round_waits_at_most_the_round_timeout():
    strategy = Zk0FedProx(ScheduleConfig(), ValidationConfig(), {}, min_nodes=2, node_timeout_s=0.0)
    with serverapp_identity(), pytest.raises(FederationAborted, match="1 nodes connected, 2 needed"):
        strategy.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord(), ListingGrid([1]))


def test_a_lone_update_after_a_warm_restart_is_judged_at_the_new_lr():
    """Round 15 trains at ~1.6e-6, round 16 restarts at 1e-4: a lone update 30x farther is expected, not huge."""
    history = FederationHistory(eval_losses=[2.0 - 0.1 * r for r in range(15)])
    strategy = Zk0FedProx(ScheduleConfig(), ValidationConfig(), {}, history, min_nodes=1)
    strategy.start_round(15, ArrayRecord(GLOBAL))
    strategy.aggregate_train(15, [_named_reply(1, 0.01), _named_reply(2, 0.01)])
    strategy.start_round(16, ArrayRecord(GLOBAL))
    assert strategy.current.schedule.lr == pytest.approx(1e-4)
    _, metrics = strategy.aggregate_train(16, [_named_reply(1, 0.3)])
    assert metrics["accepted-updates"] == 1


def test_evaluation_goes_on_with_the_nodes_still_connected():
    strategy = Zk0FedProx(ScheduleConfig(), ValidationConfig(), {}, min_nodes=2, node_timeout_s=0.0)
    with serverapp_identity():
        messages = list(strategy.configure_evaluate(1, ArrayRecord(GLOBAL), ConfigRecord(), ListingGrid([7])))
    assert [m.metadata.dst_node_id for m in messages] == [7]
    assert SERVER_METRICS_RECORD not in messages[0].content.metric_records  # none given, none sent


def test_every_evaluate_message_carries_the_servers_metrics_of_its_global():
    strategy = Zk0FedProx(ScheduleConfig(), ValidationConfig(), {}, min_nodes=1)
    strategy.start_round(1, ArrayRecord(GLOBAL))
    arrays, train = strategy.aggregate_train(1, [_named_reply(1, 1.0, examples=10), _named_reply(2, 3.0, examples=30)])
    schedule = strategy.current.schedule
    sent = server_metrics({"loss": 0.75, "kitchen": 0.5, "shelf": 1.0}, train, schedule.lr, schedule.mu, 2)
    assert sent == {"eval/loss": 0.75, "eval/loss/kitchen": 0.5, "eval/loss/shelf": 1.0,
                    "round/lr": schedule.lr, "round/mu": schedule.mu, "round/nodes": 2.0,
                    "train/policy-loss": 0.5, "train/loss-std": pytest.approx(0.1), "train/num-examples": 40.0,
                    "train/accepted-updates": 2.0}
    with serverapp_identity():
        messages = list(strategy.configure_evaluate(1, arrays, ConfigRecord(), ListingGrid([7, 8]),
                                                    server_metrics=sent))
    assert [dict(m.content.metric_records[SERVER_METRICS_RECORD]) for m in messages] == [sent, sent]
    # a round without an accepted update leaves the global as it was, and says so
    assert server_metrics({"loss": 0.75}, None, 1e-4, 0.01, 2)["train/accepted-updates"] == 0
