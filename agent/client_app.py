"""The zk0 ClientApp: what a host's SuperNode runs for each federation message.

- query ("stats"): the host's sufficient statistics over its datasets (never frames, never paths);
- train: with an agent address configured, first take a training lease from the host's agent
  (zk0.agent.lease); refused or unanswered, the node declines the round with the reason instead of
  training. Then load the round's global trainable tensors (digest checked), train with the round's LR
  and mu, return one encoded update (zk0.learn.codec) with its metrics and a hashed dataset id. A lease
  revoked mid-training (an operator started recording) stops training between steps; the steps done
  so far go out as a partial update (FedProx tolerates partial work, the server weighs it by its
  examples), or the round is declined if not one step was done;
- evaluate: check the aggregated model's digest, evaluate it on the local held-out split, and deliver it
  to the host's policy store (zk0.agent.policy_store) as version `run<Flower run id>-round<N>`, with that
  held-out loss as its node metrics; the store's first version becomes active, later ones wait for promotion.

Every reply's INFO_RECORD names the node (`node-name`) and, except a declined round's, its data (`dataset-id`,
a digest of the datasets' stable ids).

Node settings come from `context.node_config` (see zk0.agent.node): `dataset-roots` (comma-separated),
`policy-store` (its sibling `frame-cache/` keeps decoded frames across rounds, within `frame-cache-bytes`,
by default what the datasets' frames need),
`device`, `agent-address` (the agent's control API; empty: train without asking), `node-name`, and `drill`,
a fault-injection drill (zk0.agent.node.DRILLS) that makes this node send one kind of bad reply so an
operator can watch the server refuse or contain it:
- `nan`: an fp32 update with a NaN in it, re-sealed; `hash`: an update whose checksum does not match;
- `stats-nan`: NaN sufficient statistics in the statistics reply (the node trains normally);
- `inflate-examples`: a train reply claiming `INFLATE_EXAMPLES` times its examples;
- `huge-norm`: the update's delta from the global scaled by `HUGE_NORM_FACTOR`, a well-formed payload;
- `stale-base`: a delta payload taken against another global than the round's (a node that missed a round).
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from zk0.agent import lease
from zk0.agent.node import DRILLS
from zk0.learn import codec
from zk0.learn import stats as fedstats
from zk0.learn.data import ConcatData, dataset_stable_id, policy_image_size
from zk0.learn.frame_cache import FrameCache, sized_frame_cache
from zk0.learn.policy import PolicyBundle
from zk0.learn.federation import (
    DATASET_ID, DECLINED, GLOBAL_SHA256, INFO_RECORD, METRICS_RECORD, NODE_NAME, PREEMPTED, STATS_RECORD,
    UPDATE_RECORD, build_federated_policy, frozen_sha256, held_out_data, stats_from_record, stats_to_record,
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
    """A digest naming this host's data for the server; reveals neither paths nor contents, and stays the
    same while the datasets are copied, touched or re-opened."""
    return hashlib.sha256(",".join(sorted(dataset_stable_id(r) for r in roots)).encode()).hexdigest()[:16]


def node_name(context: Context) -> str:
    return str(context.node_config.get("node-name", ""))


def node_info(context: Context) -> ConfigRecord:
    """The INFO_RECORD of every reply that carries data: who sent it, about which datasets."""
    return ConfigRecord({NODE_NAME: node_name(context), DATASET_ID: dataset_id(dataset_roots(context))})


def drill(context: Context) -> str:
    """The node's fault-injection drill, or "" for an honest node."""
    kind = str(context.node_config.get("drill", ""))
    if kind and kind not in DRILLS:
        raise ValueError(f"node config drill must be one of {', '.join(DRILLS)}, got {kind!r}")
    return kind


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
        train, held_out = held_out_data(roots, bundle.policy.config, float(config["eval-fraction"]),
                                        cache=frame_cache(context, bundle, roots))
        _session = NodeSession(key, bundle, train[0] if len(train) == 1 else ConcatData(train), held_out, stats)
    if frozen_sha256(_session.bundle.policy) != config["frozen-sha256"]:
        raise ValueError("this node's frozen model weights differ from the server's (model or library version mismatch)")
    return _session


def frame_cache(context: Context, bundle: PolicyBundle, roots: list[Path]) -> FrameCache:
    """Decoded frames at the policy's input size, kept on disk beside the policy store: Flower starts a
    ClientApp process per message, so an in-memory cache alone would decode every episode again each round."""
    store = str(context.node_config.get("policy-store", ""))
    budget = context.node_config.get("frame-cache-bytes")
    return sized_frame_cache(policy_image_size(bundle.policy.config), roots,
                             Path(store).parent / "frame-cache" if store else None,
                             int(budget) if budget is not None else None)


def checked_global(content: RecordDict) -> dict:
    state = dict(content.array_records["arrays"].to_torch_state_dict())
    if codec.tensors_sha256(state) != content.config_records["config"][GLOBAL_SHA256]:
        raise ValueError("received global model does not match its SHA-256")
    return state


def corrupt_payload(payload: bytes, kind: str) -> bytes:
    """Drills 'nan' and 'hash': 'hash' flips a body byte; 'nan' writes NaN into an fp32 payload and re-seals it."""
    data = bytearray(payload)
    body_end = len(data) - 32
    if kind == "hash":
        data[body_end - 1] ^= 0xFF
        return bytes(data)
    if kind == "nan":
        struct.pack_into("<f", data, body_end - 4, float("nan"))
        data[body_end:] = hashlib.sha256(bytes(data[:body_end])).digest()
        return bytes(data)
    raise ValueError(f"corrupt_payload knows 'nan' and 'hash', got {kind!r}")


HUGE_NORM_FACTOR = 1e4
INFLATE_EXAMPLES = 1000


def huge_norm(state: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drill 'huge-norm': the update's delta from the global, scaled by HUGE_NORM_FACTOR."""
    return {k: global_state[k] + HUGE_NORM_FACTOR * (v - global_state[k]) for k, v in state.items()}


def stale_base_payload(state: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor],
                       codec_name: str) -> bytes:
    """Drill 'stale-base': a delta payload taken against another global than the round's, as a node that
    missed a round would send (the round's codec if it is a delta codec, else int8-delta)."""
    delta_codec = codec_name if codec.CODECS[codec_name].is_delta else "int8-delta"
    other_global = {k: v + 1e-3 for k, v in global_state.items()}
    return codec.encode(state, delta_codec, base=other_global)


def encoded_update(state: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor], codec_name: str,
                   kind: str = "") -> bytes:
    """The payload a node sends for `state`: encoded against the round's global, or as drill `kind` breaks it."""
    if kind == "stale-base":
        return stale_base_payload(state, global_state, codec_name)
    if kind == "huge-norm":
        state = huge_norm(state, global_state)
    payload = codec.encode(state, codec_name, base=global_state)
    return corrupt_payload(payload, kind) if kind in ("nan", "hash") else payload


def inflate_examples(metrics: Mapping[str, float]) -> dict[str, float]:
    """Drill 'inflate-examples': the train metrics claiming INFLATE_EXAMPLES times the examples trained on."""
    return {**metrics, "num-examples": metrics["num-examples"] * INFLATE_EXAMPLES}


def nan_stats(stats: fedstats.SufficientStats) -> fedstats.SufficientStats:
    """Drill 'stats-nan': the same statistics with NaN means and sums of squares."""
    return fedstats.SufficientStats({
        name: dataclasses.replace(fs, mean=np.full_like(fs.mean, np.nan), m2=np.full_like(fs.m2, np.nan))
        for name, fs in stats.features.items()})


@app.query()
def query(msg: Message, context: Context) -> Message:
    stats = fedstats.combine([fedstats.from_dataset(root) for root in dataset_roots(context)])
    if drill(context) == "stats-nan":
        stats = nan_stats(stats)
    content = RecordDict({STATS_RECORD: stats_to_record(stats), INFO_RECORD: node_info(context),
                          METRICS_RECORD: MetricRecord({"num-frames": stats.count})})
    return Message(content, reply_to=msg)


def declined(msg: Message, context: Context, reason: str) -> Message:
    """The reply of a node that does not train this round: no update, only who and why (its datasets are
    not even opened)."""
    return Message(RecordDict({INFO_RECORD: ConfigRecord({NODE_NAME: node_name(context), DECLINED: reason})}),
                   reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    address = str(context.node_config.get("agent-address", ""))
    if not address:
        return train_round(msg, context, should_stop=lambda: False)
    held = lease.acquire(address, holder=f"flower node {context.node_id}")
    if isinstance(held, lease.LeaseRefusal):
        return declined(msg, context, f"training lease refused: {held.reason}")
    with held:
        reply = train_round(msg, context, held.should_stop)
    steps = int(reply.content.metric_records[METRICS_RECORD]["steps"])
    if held.lost_reason is None or steps == int(msg.content.config_records["config"]["local-steps"]):
        return reply  # lost after the last step, if at all: a complete update
    if steps == 0:
        return declined(msg, context, held.lost_reason)
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
    kind = drill(context)
    payload = encoded_update(result.state, global_state, str(config["codec"]), kind)
    metrics = {
        "num-examples": result.examples, "policy-loss": result.policy_loss, "proximal-loss": result.proximal_loss,
        "grad-norm": result.grad_norm, "update-norm": result.update_norm, "steps": result.steps_done,
        "train-seconds": result.seconds, "loss-std": float(np.std(result.losses)) if result.losses else 0.0,
        "lr": float(config["lr"]), "mu": float(config["proximal-mu"]),
    }
    if kind == "inflate-examples":
        metrics = inflate_examples(metrics)
    content = RecordDict({UPDATE_RECORD: codec.to_array_record(payload), METRICS_RECORD: MetricRecord(metrics),
                          INFO_RECORD: node_info(context)})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    from zk0.agent.policy_store import PolicyStore
    from zk0.learn.evaluate import EvalConfig, evaluate_datasets
    from zk0.learn.policy import load_trainable_state

    node = session(context, msg.content)
    config = msg.content.config_records["config"]
    load_trainable_state(node.bundle.policy, checked_global(msg.content))
    metrics: dict[str, float] = {"num-examples": 0}
    if node.held_out:
        cfg = EvalConfig(seed=int(config["seed"]) + 1234)
        losses = evaluate_datasets(node.bundle.policy, node.bundle.preprocessor, node.held_out, cfg)
        metrics = {"loss": losses["composite"], "num-examples": sum(len(d.frame_index()) for d in node.held_out.values())}
    # the message does not carry the server's own evaluation: the daemon records it later (set_server_metrics)
    store = PolicyStore(Path(str(context.node_config.get("policy-store", "policies"))))
    store.add_from_bundle(node.bundle, run=f"run{context.run_id}", round=int(config["server-round"]), stats=node.stats,
                          server_metrics={}, global_sha256=str(config[GLOBAL_SHA256]), node_metrics=metrics)
    return Message(RecordDict({METRICS_RECORD: MetricRecord(metrics), INFO_RECORD: node_info(context)}), reply_to=msg)
