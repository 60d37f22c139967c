"""The zk0 ClientApp: what a host's SuperNode runs for each federation message.

- query ("stats"): the host's sufficient statistics over its datasets (never frames, never paths);
- train: with an agent address configured, first take a training lease from the host's agent
  (zk0.agent.lease); refused or unanswered, the node declines the round with the reason instead of
  training. Then load the round's global trainable tensors (digest checked), train with the round's LR
  and mu, return one encoded update (zk0.learn.codec) with its metrics and a hashed dataset id. A lease
  revoked mid-training (an operator started recording) stops training between steps; the steps done
  so far go out as a partial update (FedProx tolerates partial work, the server weighs it by its
  examples), or the round is declined if not one step was done;
- evaluate: check the aggregated model's digest, evaluate it on the local held-out split, and save
  it as a lerobot checkpoint in the host's policy store (`<policy-store>/round_<N>`).

Node settings come from `context.node_config` (see zk0.agent.node): `dataset-roots` (comma-separated),
`policy-store` (its sibling `frame-cache/` keeps decoded frames across rounds, within `frame-cache-bytes`),
`device`, `agent-address` (the agent's control API; empty: train without asking), and `corrupt-updates`
("nan" or "hash"), a fault-injection drill that makes this node send broken updates so an operator can
watch the server refuse them.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from zk0.agent import lease
from zk0.learn import codec
from zk0.learn import stats as fedstats
from zk0.learn.data import ConcatData, FrameCache, dataset_fingerprint
from zk0.learn.policy import PolicyBundle
from zk0.learn.federation import (
    DECLINED, GLOBAL_SHA256, INFO_RECORD, METRICS_RECORD, PREEMPTED, STATS_RECORD, UPDATE_RECORD,
    build_federated_policy, frozen_sha256, held_out_data, stats_from_record, stats_to_record,
)

app = ClientApp()


@dataclass
class NodeSession:
    """The host's policy and data, built once per ClientApp process and reused across messages."""

    key: tuple
    bundle: PolicyBundle
    train_data: Any
    held_out: dict
    stats: fedstats.SufficientStats


_session: NodeSession | None = None


def dataset_roots(context: Context) -> list[Path]:
    roots = [Path(p) for p in str(context.node_config.get("dataset-roots", "")).split(",") if p]
    if not roots:
        raise ValueError("node config has no dataset-roots")
    for root in roots:
        if not (root / "meta" / "info.json").is_file():
            raise ValueError(f"node dataset {root.name} is not a LeRobot dataset")
    return roots


def dataset_id(roots: list[Path]) -> str:
    """A digest naming this host's data for the server's logs; reveals neither paths nor contents."""
    return hashlib.sha256(",".join(sorted(dataset_fingerprint(r) for r in roots)).encode()).hexdigest()[:16]


def session(context: Context, content: RecordDict) -> NodeSession:
    global _session
    config = content.config_records["config"]
    stats = stats_from_record(content.array_records[STATS_RECORD])
    model, seed = str(config["model"]), int(config["seed"])
    roots = dataset_roots(context)
    stats_digest = hashlib.sha256(b"".join(np.ascontiguousarray(v).tobytes() for _, v in sorted(stats.to_record().items())))
    key = (model, seed, float(config["eval-fraction"]), tuple(roots), stats_digest.hexdigest())
    if _session is None or _session.key != key:
        bundle = build_federated_policy(model, str(context.node_config.get("device", "cpu")), roots[0], stats, seed)
        train, held_out = held_out_data(roots, bundle.policy.config, float(config["eval-fraction"]), seed,
                                        frame_cache(context))
        _session = NodeSession(key, bundle, train[0] if len(train) == 1 else ConcatData(train), held_out, stats)
    if frozen_sha256(_session.bundle.policy) != config["frozen-sha256"]:
        raise ValueError("this node's frozen model weights differ from the server's (model or library version mismatch)")
    return _session


def frame_cache(context: Context) -> FrameCache:
    """Decoded frames kept on disk beside the policy store: Flower starts a ClientApp process per message,
    so an in-memory cache alone would decode every episode again each round."""
    store = str(context.node_config.get("policy-store", ""))
    if not store:
        return FrameCache()
    budget = int(context.node_config.get("frame-cache-bytes", 4 << 30))
    return FrameCache(disk_dir=Path(store).parent / "frame-cache", disk_bytes=budget)


def checked_global(content: RecordDict) -> dict:
    state = dict(content.array_records["arrays"].to_torch_state_dict())
    if codec.tensors_sha256(state) != content.config_records["config"][GLOBAL_SHA256]:
        raise ValueError("received global model does not match its SHA-256")
    return state


def corrupt_payload(payload: bytes, kind: str) -> bytes:
    """Fault-injection drill: 'hash' flips a body byte; 'nan' writes NaN into an fp32 payload and re-seals it."""
    data = bytearray(payload)
    body_end = len(data) - 32
    if kind == "hash":
        data[body_end - 1] ^= 0xFF
        return bytes(data)
    if kind == "nan":
        struct.pack_into("<f", data, body_end - 4, float("nan"))
        data[body_end:] = hashlib.sha256(bytes(data[:body_end])).digest()
        return bytes(data)
    raise ValueError(f"corrupt-updates must be 'nan' or 'hash', got {kind!r}")


@app.query()
def query(msg: Message, context: Context) -> Message:
    roots = dataset_roots(context)
    stats = fedstats.combine([fedstats.from_dataset(root) for root in roots])
    content = RecordDict({STATS_RECORD: stats_to_record(stats),
                          INFO_RECORD: ConfigRecord({"dataset-id": dataset_id(roots)}),
                          METRICS_RECORD: MetricRecord({"num-frames": stats.count})})
    return Message(content, reply_to=msg)


def declined(msg: Message, reason: str) -> Message:
    """The reply of a node that does not train this round: no update, only why."""
    return Message(RecordDict({INFO_RECORD: ConfigRecord({DECLINED: reason})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    address = str(context.node_config.get("agent-address", ""))
    if not address:
        return train_round(msg, context, should_stop=lambda: False)
    held = lease.acquire(address, holder=f"flower node {context.node_id}")
    if isinstance(held, lease.LeaseRefusal):
        return declined(msg, f"training lease refused: {held.reason}")
    with held:
        reply = train_round(msg, context, held.should_stop)
    steps = int(reply.content.metric_records[METRICS_RECORD]["steps"])
    if held.lost_reason is None or steps == int(msg.content.config_records["config"]["local-steps"]):
        return reply  # lost after the last step, if at all: a complete update
    if steps == 0:
        return declined(msg, held.lost_reason)
    reply.content.config_records[INFO_RECORD][PREEMPTED] = held.lost_reason
    return reply


def train_round(msg: Message, context: Context, should_stop: Callable[[], bool]) -> Message:
    """Train on the round's global until the step budget is spent or `should_stop()`; the reply with the update."""
    from zk0.learn.trainer import LocalTrainer, TrainerConfig

    node = session(context, msg.content)
    config = msg.content.config_records["config"]
    global_state = checked_global(msg.content)
    trainer = LocalTrainer(node.bundle.policy, node.bundle.preprocessor, node.train_data,
                           TrainerConfig(batch_size=int(config["batch-size"]),
                                         seed=int(config["seed"]) + 7919 * int(config["server-round"])))
    result = trainer.train(global_state, int(config["local-steps"]), lr=float(config["lr"]),
                           mu=float(config["proximal-mu"]), should_stop=should_stop)
    payload = codec.encode(result.state, str(config["codec"]), base=global_state)
    fault = str(context.node_config.get("corrupt-updates", ""))
    if fault:
        payload = corrupt_payload(payload, fault)
    metrics = MetricRecord({
        "num-examples": result.examples, "policy-loss": result.policy_loss, "proximal-loss": result.proximal_loss,
        "grad-norm": result.grad_norm, "update-norm": result.update_norm, "steps": result.steps_done,
        "train-seconds": result.seconds, "loss-std": float(np.std(result.losses)) if result.losses else 0.0,
        "lr": float(config["lr"]), "mu": float(config["proximal-mu"]),
    })
    content = RecordDict({UPDATE_RECORD: codec.to_array_record(payload), METRICS_RECORD: metrics,
                          INFO_RECORD: ConfigRecord({"dataset-id": dataset_id(dataset_roots(context))})})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    from zk0.learn.checkpoint import CheckpointMeta, save_checkpoint
    from zk0.learn.evaluate import EvalConfig, evaluate_datasets
    from zk0.learn.policy import load_trainable_state

    node = session(context, msg.content)
    config = msg.content.config_records["config"]
    load_trainable_state(node.bundle.policy, checked_global(msg.content))
    server_round = int(config["server-round"])
    store = Path(str(context.node_config.get("policy-store", "policies")))
    save_checkpoint(store / f"round_{server_round}", node.bundle,
                    CheckpointMeta(run="federation", round=server_round,
                                   extra={GLOBAL_SHA256: str(config[GLOBAL_SHA256])}), stats=node.stats)
    metrics: dict[str, float] = {"num-examples": 0}
    if node.held_out:
        cfg = EvalConfig(seed=int(config["seed"]) + 1234)
        losses = evaluate_datasets(node.bundle.policy, node.bundle.preprocessor, node.held_out, cfg)
        metrics = {"loss": losses["composite"], "num-examples": sum(len(d.frame_index()) for d in node.held_out.values())}
    return Message(RecordDict({METRICS_RECORD: MetricRecord(metrics)}), reply_to=msg)
