"""The zk0 ServerApp: normalization agreement, scheduled FedProx rounds, server evaluation, checkpoints.

Flow of one run (Flower's `ServerApp` + `Grid`; rounds driven here rather than by `Strategy.start`
so that a restarted server resumes at the round after its last checkpoint and can stop early):

1. normalization agreement: every node answers a statistics query with its sufficient statistics;
   each answer is checked (statistics that do not decode or are malformed, no dataset id: rejected,
   with the reason logged) and recorded per node in `federated_metrics.json` under
   `normalization.nodes`; the exact union of the valid ones is the normalization every participant
   and every checkpoint uses. Fewer valid answers than `nodes.min_nodes` end the run;
2. round 0: the initial global policy is evaluated on the server's held-out data and saved;
3. each round: train (LR/mu from the schedule, per node) -> validate + aggregate -> server evaluation ->
   nodes evaluate and store the new global, with the server's metrics of it (its held-out loss, the round's
   LR/mu and aggregated training metrics: zk0.server.evaluation.server_metrics) -> checkpoint, metrics,
   plots -> early-stopping check.

A run that cannot go on (too few nodes within the round timeout, too few valid statistics) raises
`FederationAborted`: `main` logs its one-line reason to server.log and ends the ServerApp normally.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from zk0.learn.checkpoint import CheckpointMeta, load_checkpoint, read_meta, save_checkpoint
from zk0.learn.policy import load_trainable_state, trainable_state
from zk0.learn.sufficient_stats import StatsInvalid, StatsMismatch, SufficientStats, combine
from zk0.server.config import ServerConfig, server_config_from_run_config
from zk0.learn.federation import (
    INFO_RECORD, QUERY_STATS, STATS_RECORD, build_federated_policy, frozen_sha256, stats_from_record,
    stats_to_record,
)
from zk0.server.evaluation import EarlyStopping, ServerEvaluator, server_metrics
from zk0.server.run_dir import RunDir, outcome_summary
from zk0.server.node_wait import FederationAborted, wait_for_nodes
from zk0.server.strategy import (
    FederationHistory, Outcome, Zk0FedProx, error_outcome, match_replies, node_identity, node_label,
)

log = logging.getLogger("zk0.server")


app = ServerApp()


@dataclass(frozen=True)
class StatsAnswer:
    """One node's answer to the statistics query (outcomes: accepted, rejected, failed, lost, no reply)."""

    outcome: Outcome
    reason: str = ""
    name: str = ""
    dataset_id: str = ""
    stats: SufficientStats | None = field(default=None, compare=False, repr=False)

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "dataset_id": self.dataset_id, "outcome": str(self.outcome), "reason": self.reason}


def judge_stats_reply(reply: Message) -> StatsAnswer:
    """A statistics reply checked like an update: accepted with its statistics, or refused with the reason."""
    if reply.has_error():
        return StatsAnswer(error_outcome(reply.error), reply.error.reason)
    info = reply.content.config_records.get(INFO_RECORD)
    if info is None:
        return StatsAnswer(Outcome.REJECTED, "reply carries no info record")
    dataset_id, name = node_identity(info)
    if not dataset_id:
        return StatsAnswer(Outcome.REJECTED, "reply carries no dataset id", name)
    record = reply.content.array_records.get(STATS_RECORD)
    if record is None:
        return StatsAnswer(Outcome.REJECTED, "reply carries no statistics", name, dataset_id)
    try:
        stats = stats_from_record(record)
    except StatsInvalid as err:
        return StatsAnswer(Outcome.REJECTED, err.reason, name, dataset_id)
    return StatsAnswer(Outcome.ACCEPTED, "", name, dataset_id, stats)


@dataclass(frozen=True)
class Normalization:
    """The agreed statistics, the datasets they cover and every queried node's answer."""

    stats: SufficientStats
    dataset_ids: list[str]
    nodes: dict[int, StatsAnswer]

    def to_json(self) -> dict[str, Any]:
        """What `federated_metrics.json` keeps under "normalization"."""
        return {"nodes": {str(node_id): answer.to_json() for node_id, answer in self.nodes.items()}}


def combine_answers(
    answers: Mapping[int, StatsAnswer],
) -> tuple[dict[int, StatsAnswer], dict[str, SufficientStats]]:
    """(every node's final answer, the accepted statistics by dataset id). Each dataset counts once (two nodes
    may report the same data); an answer whose statistics do not combine with those before it is rejected."""
    nodes = dict(answers)
    by_dataset: dict[str, SufficientStats] = {}
    for node_id, answer in answers.items():
        if answer.stats is None or answer.dataset_id in by_dataset:
            continue
        try:
            combine([*by_dataset.values(), answer.stats])
        except StatsMismatch as err:
            nodes[node_id] = StatsAnswer(Outcome.REJECTED, f"statistics do not combine with the others: {err}",
                                         answer.name, answer.dataset_id)
            continue
        by_dataset[answer.dataset_id] = answer.stats
    return nodes, by_dataset


def agree_normalization(grid: Grid, min_nodes: int, timeout_s: float) -> Normalization:
    """Ask every connected node (at least `min_nodes`) for its statistics and combine the valid ones exactly;
    `FederationAborted` when fewer than `min_nodes` answers are valid."""
    node_ids = wait_for_nodes(grid, min_nodes, timeout_s)
    query = [Message(RecordDict({"config": ConfigRecord({"query": QUERY_STATS})}), message_type=MessageType.QUERY,
                     dst_node_id=node_id) for node_id in node_ids]
    answers = {node_id: StatsAnswer(Outcome.NO_REPLY, "no answer within the round timeout") for node_id in node_ids}
    for node_id, reply in match_replies(query, grid.send_and_receive(query, timeout=timeout_s)):
        answers[node_id] = judge_stats_reply(reply)
    nodes, by_dataset = combine_answers(answers)
    refused = {n: a for n, a in nodes.items() if a.outcome != Outcome.ACCEPTED}
    for node_id, answer in refused.items():
        log.warning("statistics query: %s %s: %s", node_label(node_id, answer.name), answer.outcome, answer.reason)
    accepted = len(nodes) - len(refused)
    if accepted < min_nodes:
        raise FederationAborted(f"normalization: {accepted} valid statistics answers, {min_nodes} needed")
    agreement = Normalization(combine(list(by_dataset.values())), sorted(by_dataset), nodes)
    log.info("normalization agreed over %d nodes, %d datasets, %d frames", accepted, len(by_dataset),
             agreement.stats.count)
    return agreement


def start_history(agreement: Normalization) -> FederationHistory:
    """A new run's history, knowing each queried node's dataset id and name from its statistics answer."""
    history = FederationHistory()
    for node_id, answer in agreement.nodes.items():
        history.note_node(node_id, answer.dataset_id, answer.name)
    return history


def _client_entries(strategy: Zk0FedProx) -> dict[str, dict[str, Any]]:
    assert strategy.current is not None
    return {str(c.node_id): {"name": c.name, "lr": c.lr, "mu": c.mu, "outcome": str(c.outcome), "reason": c.reason,
                             "accepted": c.accepted, "bytes_in": c.bytes_in, "metrics": c.metrics}
            for c in strategy.current.clients.values()}


def run_federation(grid: Grid, config: ServerConfig) -> int:
    """Run (or resume) the configured federation; returns the last finished round."""
    training, nodes = config.training, config.nodes
    if not config.evaluation.datasets:
        raise ValueError("evaluation.datasets: the server needs at least one held-out dataset")
    run = RunDir(config.run_dir)
    eval_roots = [Path(p) for p in config.evaluation.datasets]
    last = run.last_round()
    metrics = run.load_metrics()
    if last is None:
        agreement = agree_normalization(grid, nodes.min_nodes, nodes.round_timeout_s)
        stats, dataset_ids, normalization = agreement.stats, agreement.dataset_ids, agreement.to_json()
        history = start_history(agreement)
    else:
        stats = SufficientStats.from_record(dict(np.load(run.checkpoint_dir(last) / "zk0_stats.npz")))
        dataset_ids = list(metrics.get("dataset_ids", []))
        normalization = metrics.get("normalization", {})
        history = FederationHistory.from_json(metrics.get("history", {}))
        log.info("resuming after round %d from %s", last, run.checkpoint_dir(last))
    bundle = build_federated_policy(training.model, "cpu", eval_roots[0], stats, training.seed)
    if last is not None:
        saved, _ = load_checkpoint(run.checkpoint_dir(last))
        load_trainable_state(bundle.policy, trainable_state(saved.policy))
    evaluator = ServerEvaluator(bundle, eval_roots, training.eval_fraction, training.seed, config.evaluation.max_samples)
    strategy = Zk0FedProx(
        config.scheduler, config.validation, history=history, min_nodes=nodes.min_nodes,
        fraction_train=nodes.fraction_train, fraction_evaluate=nodes.fraction_evaluate,
        node_timeout_s=nodes.round_timeout_s,
        train_config={"local-steps": training.local_steps, "batch-size": training.batch_size, "codec": training.codec,
                      "model": training.model, "seed": training.seed, "eval-fraction": training.eval_fraction},
    )
    strategy.broadcast_records = {STATS_RECORD: stats_to_record(stats)}
    strategy.broadcast_config = {"frozen-sha256": frozen_sha256(bundle.policy)}
    run_info = {"run_dir": str(run.root), "model": training.model, "codec": training.codec, "dataset_ids": dataset_ids,
                "normalization": normalization}
    stopper = EarlyStopping(config.evaluation.patience, config.evaluation.min_delta)

    parent_sha = None if last is None else read_meta(run.checkpoint_dir(last)).sha256

    def checkpoint(server_round: int, entry: dict[str, Any]) -> None:
        nonlocal parent_sha
        meta = save_checkpoint(run.checkpoint_dir(server_round), bundle,
                               CheckpointMeta(run=run.root.name, round=server_round, parent=parent_sha), stats=stats)
        parent_sha = meta.sha256
        run.record_round({**entry, "checkpoint_sha256": meta.sha256}, history.to_json(), run_info)

    if last is None:
        server_eval = evaluator.evaluate()
        log.info("round 0: server eval loss %.4f", server_eval["loss"])
        checkpoint(0, {"round": 0, "server_eval": server_eval, "clients": {}})
        last = 0
    arrays = ArrayRecord(trainable_state(bundle.policy))
    for server_round in range(last + 1, training.rounds + 1):
        started = time.monotonic()
        replies = grid.send_and_receive(strategy.configure_train(server_round, arrays, ConfigRecord(), grid),
                                        timeout=nodes.round_timeout_s)
        train_done = time.monotonic()
        new_arrays, train_summary = strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            arrays = new_arrays
            load_trainable_state(bundle.policy, arrays.to_torch_state_dict())
        # evaluated before the nodes get the global, so that each node's store keeps the server's metrics with it
        server_eval = evaluator.evaluate()
        history.eval_losses.append(server_eval["loss"])
        record = strategy.current
        assert record is not None
        sent_metrics = server_metrics(server_eval, train_summary, record.schedule.lr, record.schedule.mu,
                                      len(record.clients))
        eval_sent = time.monotonic()
        eval_replies = grid.send_and_receive(
            strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid, server_metrics=sent_metrics),
            timeout=nodes.round_timeout_s)
        eval_done = time.monotonic()
        client_eval = strategy.aggregate_evaluate(server_round, eval_replies)
        entry = {
            "round": server_round, "lr": record.schedule.lr, "mu": record.schedule.mu,
            "schedule_reason": record.schedule.reason, "clients": _client_entries(strategy),
            "train": dict(train_summary or {}), "client_eval": dict(client_eval or {}), "server_eval": server_eval,
            "bytes_out": record.bytes_out, "bytes_in": sum(c.bytes_in for c in record.clients.values()),
            "seconds": time.monotonic() - started,
            # wall time of each phase's messages, from sending to the last reply (bench/round_overhead.py)
            "phase_seconds": {"train": train_done - started, "evaluate": eval_done - eval_sent},
        }
        checkpoint(server_round, entry)
        log.info("round %d: server eval loss %.4f, %s", server_round, server_eval["loss"],
                 outcome_summary([c.outcome for c in record.clients.values()]))
        if stopper.should_stop(history.eval_losses):
            log.info("early stop after round %d: no improvement in %d rounds", server_round, stopper.patience)
            return server_round
    return training.rounds


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = server_config_from_run_config(context.run_config)
    config.run_dir.mkdir(parents=True, exist_ok=True)
    # The run directory keeps the server's decisions (schedule, rejected updates) next to its metrics.
    handler = logging.FileHandler(config.run_dir / "server.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        run_federation(grid, config)
    except FederationAborted as err:
        log.error("run ended: %s", err.reason)
    finally:
        log.removeHandler(handler)
        handler.close()
