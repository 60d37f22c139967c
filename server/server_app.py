"""The zk0 ServerApp: normalization agreement, scheduled FedProx rounds, server evaluation, checkpoints.

Flow of one run (Flower's `ServerApp` + `Grid`; rounds driven here rather than by `Strategy.start`
so that a restarted server resumes at the round after its last checkpoint and can stop early):

1. normalization agreement: every node answers a statistics query with its sufficient statistics;
   the exact union is the normalization every participant and every checkpoint uses;
2. round 0: the initial global policy is evaluated on the server's held-out data and saved;
3. each round: train (LR/mu from the schedule, per node) -> validate + aggregate -> nodes evaluate and
   store the new global -> server evaluation -> checkpoint, metrics, plots -> early-stopping check.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from zk0.learn import stats as fedstats
from zk0.learn.checkpoint import CheckpointMeta, load_checkpoint, read_meta, save_checkpoint
from zk0.learn.policy import load_trainable_state, trainable_state
from zk0.server.config import ServerConfig, server_config_from_run_config
from zk0.learn.federation import (
    INFO_RECORD, QUERY_STATS, STATS_RECORD, build_federated_policy, frozen_sha256, stats_from_record,
    stats_to_record,
)
from zk0.server.evaluation import EarlyStopping, ServerEvaluator
from zk0.server.run_dir import RunDir, outcome_summary
from zk0.server.strategy import FederationHistory, Zk0FedProx, wait_for_nodes

log = logging.getLogger("zk0.server")


app = ServerApp()


def agree_normalization(grid: Grid, min_nodes: int, timeout_s: float) -> tuple[fedstats.SufficientStats, list[str]]:
    """Ask every connected node (at least `min_nodes`) for its statistics and combine them exactly."""
    node_ids = wait_for_nodes(grid, min_nodes)
    query = [Message(RecordDict({"config": ConfigRecord({"query": QUERY_STATS})}), message_type=MessageType.QUERY,
                     dst_node_id=node_id) for node_id in node_ids]
    by_dataset: dict[str, fedstats.SufficientStats] = {}
    answered = 0
    for reply in grid.send_and_receive(query, timeout=timeout_s):
        if reply.has_error():
            log.warning("statistics query: node %d failed: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        answered += 1
        # The same data reported by two nodes is counted once: the agreement is over the union of frames.
        dataset_id = str(reply.content.config_records[INFO_RECORD]["dataset-id"])
        by_dataset[dataset_id] = stats_from_record(reply.content.array_records[STATS_RECORD])
    if answered < min_nodes:
        raise RuntimeError(f"statistics query: {answered} nodes answered, {min_nodes} needed")
    parts = list(by_dataset.values())
    log.info("normalization agreed over %d nodes, %d datasets, %d frames", answered, len(parts),
             sum(p.count for p in parts))
    return fedstats.combine(parts), sorted(by_dataset)


def _client_entries(strategy: Zk0FedProx) -> dict[str, dict[str, Any]]:
    assert strategy.current is not None
    return {str(c.node_id): {"lr": c.lr, "mu": c.mu, "outcome": str(c.outcome), "reason": c.reason,
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
        stats, dataset_ids = agree_normalization(grid, nodes.min_nodes, nodes.round_timeout_s)
        history = FederationHistory()
    else:
        stats = fedstats.SufficientStats.from_record(dict(np.load(run.checkpoint_dir(last) / "zk0_stats.npz")))
        dataset_ids = list(metrics.get("dataset_ids", []))
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
        train_config={"local-steps": training.local_steps, "batch-size": training.batch_size, "codec": training.codec,
                      "model": training.model, "seed": training.seed, "eval-fraction": training.eval_fraction},
    )
    strategy.broadcast_records = {STATS_RECORD: stats_to_record(stats)}
    strategy.broadcast_config = {"frozen-sha256": frozen_sha256(bundle.policy)}
    run_info = {"run_dir": str(run.root), "model": training.model, "codec": training.codec, "dataset_ids": dataset_ids}
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
        new_arrays, train_summary = strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            arrays = new_arrays
            load_trainable_state(bundle.policy, arrays.to_torch_state_dict())
        eval_replies = grid.send_and_receive(strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid),
                                             timeout=nodes.round_timeout_s)
        client_eval = strategy.aggregate_evaluate(server_round, eval_replies)
        server_eval = evaluator.evaluate()
        history.eval_losses.append(server_eval["loss"])
        record = strategy.current
        assert record is not None
        entry = {
            "round": server_round, "lr": record.schedule.lr, "mu": record.schedule.mu,
            "schedule_reason": record.schedule.reason, "clients": _client_entries(strategy),
            "train": dict(train_summary or {}), "client_eval": dict(client_eval or {}), "server_eval": server_eval,
            "bytes_out": record.bytes_out, "bytes_in": sum(c.bytes_in for c in record.clients.values()),
            "seconds": time.monotonic() - started,
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
    finally:
        log.removeHandler(handler)
        handler.close()
