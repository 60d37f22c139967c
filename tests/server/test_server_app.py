"""The ServerApp's normalization agreement (each node's statistics answer checked and recorded), a whole round
with a real node (its store keeps the server's metrics of each global) and its end."""

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode

from tests.server.flower_app import AnsweringGrid, serverapp_identity
from zk0.learn.federation import DATASET_ID, INFO_RECORD, NODE_NAME, STATS_RECORD, stats_to_record
from zk0.learn.sufficient_stats import SufficientStats, combine, from_arrays
from zk0.server import server_app
from zk0.server.server_app import StatsAnswer, agree_normalization, judge_stats_reply, start_history
from zk0.server.node_wait import FederationAborted
from zk0.server.strategy import Outcome


def _stats(offset: float, frames: int = 6) -> SufficientStats:
    rng = np.random.default_rng(int(offset))
    return from_arrays({"observation.state": rng.normal(offset, 1.0, (frames, 3)),
                        "action": rng.normal(offset, 2.0, (frames, 3))}, histogram=None)


def _nan_record() -> ArrayRecord:
    """The `stats-nan` drill: well-formed statistics whose mean is NaN."""
    record = _stats(0.0).to_record()
    record["action/mean"] = record["action/mean"].copy()
    record["action/mean"][1] = np.nan
    return ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in record.items()})


def _answer(message: Message, info: dict | None, stats: ArrayRecord | None) -> Message:
    records = {}
    if info is not None:
        records[INFO_RECORD] = ConfigRecord(info)
    if stats is not None:
        records[STATS_RECORD] = stats
    return Message(RecordDict(records), reply_to=message)


@pytest.fixture
def query():
    from tests.server.flower_app import pushed

    with serverapp_identity():
        yield pushed([Message(RecordDict({"config": ConfigRecord({"query": "stats"})}), message_type="query",
                              dst_node_id=5)])[0]


@pytest.mark.parametrize(
    ("info", "stats", "outcome", "reason", "dataset_id", "name"),
    [
        ({DATASET_ID: "dsA", NODE_NAME: "arm1"}, "good", Outcome.ACCEPTED, "", "dsA", "arm1"),
        ({DATASET_ID: "dsA"}, "good", Outcome.ACCEPTED, "", "dsA", ""),
        ({DATASET_ID: "dsA", NODE_NAME: "arm1"}, "nan", Outcome.REJECTED, "action", "dsA", "arm1"),
        ({NODE_NAME: "arm1"}, "good", Outcome.REJECTED, "reply carries no dataset id", "", "arm1"),
        (None, "good", Outcome.REJECTED, "reply carries no info record", "", ""),
        ({DATASET_ID: "dsA"}, None, Outcome.REJECTED, "reply carries no statistics", "dsA", ""),
    ],
)
def test_statistics_replies_are_checked_like_updates(query, info, stats, outcome, reason, dataset_id, name):
    record = {"good": stats_to_record(_stats(1.0)), "nan": _nan_record(), None: None}[stats]
    with serverapp_identity():
        answer = judge_stats_reply(_answer(query, info, record))
    assert (answer.outcome, answer.dataset_id, answer.name) == (outcome, dataset_id, name)
    assert reason in answer.reason
    assert (answer.stats is not None) == (outcome == Outcome.ACCEPTED)


def test_a_failed_node_is_recorded_as_failed(query):
    with serverapp_identity():
        answer = judge_stats_reply(Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "boom"), reply_to=query))
    assert answer == StatsAnswer(Outcome.FAILED, "boom")


def _fleet_answers(message: Message) -> Message | None:
    """Node 1 and 2: valid; 3: the stats-nan drill; 4: no dataset id; 5: the same dataset as node 1; 6: silent."""
    node = message.metadata.dst_node_id
    good = {1: ("dsA", 1.0), 2: ("dsB", 5.0), 5: ("dsA", 1.0)}
    if node in good:
        dataset, offset = good[node]
        return _answer(message, {DATASET_ID: dataset, NODE_NAME: f"arm{node}"}, stats_to_record(_stats(offset)))
    if node == 3:
        return _answer(message, {DATASET_ID: "dsC", NODE_NAME: "arm3"}, _nan_record())
    if node == 4:
        return _answer(message, {NODE_NAME: "arm4"}, stats_to_record(_stats(2.0)))
    return None


def test_normalization_combines_the_valid_answers_and_records_every_node(caplog):
    with serverapp_identity(), caplog.at_level("INFO", logger="zk0.server"):
        agreement = agree_normalization(AnsweringGrid([1, 2, 3, 4, 5, 6], _fleet_answers), min_nodes=2, timeout_s=60)
    assert agreement.dataset_ids == ["dsA", "dsB"]
    expected = combine([_stats(1.0), _stats(5.0)]).to_record()  # dsA counted once
    assert agreement.stats.to_record().keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(agreement.stats.to_record()[key], value)
    nodes = agreement.to_json()["nodes"]
    assert nodes["1"] == {"name": "arm1", "dataset_id": "dsA", "outcome": "accepted", "reason": ""}
    assert nodes["5"]["outcome"] == "accepted"
    assert nodes["3"]["outcome"] == "rejected" and nodes["3"]["dataset_id"] == "dsC" and nodes["3"]["reason"]
    assert nodes["4"] == {"name": "arm4", "dataset_id": "", "outcome": "rejected",
                          "reason": "reply carries no dataset id"}
    assert nodes["6"] == {"name": "", "dataset_id": "", "outcome": "no reply",
                          "reason": "no answer within the round timeout"}
    assert "statistics query: node 3 (arm3) rejected:" in caplog.text
    assert "normalization agreed over 3 nodes, 2 datasets, 12 frames" in caplog.text
    history = start_history(agreement)
    assert history.dataset_of_node == {1: "dsA", 2: "dsB", 3: "dsC", 5: "dsA"}
    assert history.node_names == {1: "arm1", 2: "arm2", 3: "arm3", 4: "arm4", 5: "arm5"}


def test_statistics_that_do_not_combine_are_rejected(query):
    def answers(message):
        node = message.metadata.dst_node_id
        stats = _stats(1.0) if node == 1 else from_arrays({"other": np.ones((4, 2))}, histogram=None)
        return _answer(message, {DATASET_ID: f"ds{node}"}, stats_to_record(stats))

    with serverapp_identity():
        agreement = agree_normalization(AnsweringGrid([1, 2], answers), min_nodes=1, timeout_s=60)
    assert agreement.dataset_ids == ["ds1"]
    assert agreement.nodes[2].outcome == Outcome.REJECTED
    assert agreement.nodes[2].reason.startswith("statistics do not combine with the others")


def test_too_few_valid_statistics_end_the_run_with_a_reason():
    with serverapp_identity(), pytest.raises(FederationAborted) as info:
        agree_normalization(AnsweringGrid([1, 3, 4, 6], _fleet_answers), min_nodes=2, timeout_s=60)
    assert info.value.reason == "normalization: 1 valid statistics answers, 2 needed"


def test_an_aborted_run_logs_one_line_and_ends_the_serverapp(tmp_path, monkeypatch):
    def aborted(grid, config):
        raise FederationAborted("1 nodes connected, 2 needed: gave up after waiting 3600 s (nodes.round_timeout_s)")

    monkeypatch.setattr(server_app, "run_federation", aborted)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={"run-dir": str(tmp_path)})
    server_app.main(None, context)  # returns: no traceback, no restart loop
    lines = (tmp_path / "server.log").read_text().splitlines()
    assert len(lines) == 1
    assert lines[0].endswith("ERROR run ended: 1 nodes connected, 2 needed: gave up after waiting 3600 s "
                             "(nodes.round_timeout_s)")
    assert not logging.getLogger("zk0.server").handlers


def test_a_round_delivers_the_global_to_the_nodes_store_with_the_servers_metrics_of_it(tmp_path, monkeypatch):
    """One round in-process: the ServerApp's loop against a real node's work (statistics, training, evaluation
    into its policy store); what the store keeps as server metrics is the server's own record of that round."""
    from tests.learn.conftest import make_dataset
    from zk0.agent import node_work
    from zk0.agent.policy_store import PolicyStore
    from zk0.server.config import EvaluationConfig, NodesConfig, ServerConfig, TrainingConfig
    from zk0.server.evaluation import server_metrics
    from zk0.server.run_dir import RunDir

    data = tmp_path / "kitchen"  # the node's data, and the server's held-out data as well
    make_dataset(data, episodes=4, frames=12)
    monkeypatch.setattr(RunDir, "plot", lambda self, rounds: None)  # pictures are not this test's business
    node = Context(run_id=1, node_id=7, state=RecordDict(), run_config={}, node_config={
        "dataset-roots": str(data), "node-name": "kitchen", "policy-store": str(tmp_path / "policies")})

    def answer(message: Message) -> Message:
        kind = message.metadata.message_type
        return Message(node_work.work(kind, message.content, node, should_stop=lambda: False), reply_to=message)

    training = TrainingConfig(rounds=1, local_steps=1, batch_size=2, model="tiny", eval_fraction=0.25)
    config = ServerConfig(run_dir=tmp_path / "run", training=training,
                          nodes=NodesConfig(min_nodes=1, round_timeout_s=60),
                          evaluation=EvaluationConfig(datasets=[str(data)], max_samples=4))
    with serverapp_identity():
        assert server_app.run_federation(AnsweringGrid([7], answer), config) == 1
    round1 = RunDir(config.run_dir).load_metrics()["rounds"][1]
    assert round1["clients"]["7"]["outcome"] == "accepted"
    stored = PolicyStore(tmp_path / "policies").get("run1-round1")
    assert stored.server_metrics == server_metrics(round1["server_eval"], round1["train"], round1["lr"], round1["mu"],
                                                   nodes=1)
    assert stored.server_metrics["eval/loss"] == round1["server_eval"]["loss"] > 0
    assert stored.server_metrics["train/accepted-updates"] == 1 and stored.node_metrics["loss"] > 0
