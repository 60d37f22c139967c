"""What a node computes for each federation message: statistics, a round of training, an evaluation.

Each function takes the message's content (a Flower RecordDict, exactly as the ClientApp received it) and the
node's Context, and returns the reply's content. The ClientApp (zk0.agent.client_app) calls them in its own
process when the node has no learning worker; the learning worker (zk0.agent.learning_worker) calls the same
functions in its long-lived process, where `session()` keeps the built policy, processors, data and frame cache
warm between messages. One code path, so both give the same bytes for the same inputs and seeds.

- statistics: the host's sufficient statistics over its datasets (never frames, never paths);
- train: load the round's global trainable tensors (digest checked), train with the round's LR and mu until
  the step budget is spent or `should_stop()` (a revoked lease), return one encoded update (zk0.learn.codec)
  with its metrics; the metrics count the steps actually done;
- evaluate: check the aggregated model's digest, evaluate it on the local held-out split, and deliver it to
  the host's policy store (zk0.agent.policy_store) as version `run<Flower run id>-round<N>`, with that
  held-out loss as its node metrics and the server's metrics the message carries as its server metrics
  (`received_server_metrics`: what is not a finite number is logged and left out); the store's first version
  becomes active, later ones wait for promotion; then the store is pruned to node config `policy-keep`
  versions and `policy-max-bytes` (never active or previous).

Drills (node config `drill`, see zk0.agent.client_app) break replies here, as the server will see them:
- `nan`: an fp32 update with a NaN in it, re-sealed; `hash`: an update whose checksum does not match;
- `stats-nan`: NaN sufficient statistics in the statistics reply (the node trains normally);
- `inflate-examples`: a train reply claiming `INFLATE_EXAMPLES` times its examples;
- `huge-norm`: the update's delta from the global scaled by `HUGE_NORM_FACTOR`, a well-formed payload;
- `stale-base`: a delta payload taken against another global than the round's (a node that missed a round).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context, MetricRecord, RecordDict

from zk0.agent.client_app import dataset_roots, drill, node_info
from zk0.learn import codec
from zk0.learn.data import ConcatData, policy_image_size
from zk0.learn.federation import build_federated_policy, frozen_sha256, held_out_data, stats_from_record, stats_to_record
from zk0.learn.frame_cache import FrameCache, sized_frame_cache
from zk0.learn.policy import PolicyBundle
from zk0.learn.records import (GLOBAL_SHA256, INFO_RECORD, METRICS_RECORD, SERVER_METRICS_RECORD, STATS_RECORD,
                              UPDATE_RECORD)
from zk0.learn.stats import from_dataset
from zk0.learn.sufficient_stats import SufficientStats, combine

log = logging.getLogger("zk0.agent.node_work")


@dataclass
class NodeSession:
    """The host's policy and data for one run and model configuration, reused across that run's messages."""

    key: tuple
    bundle: PolicyBundle
    train_data: Any
    held_out: dict
    stats: SufficientStats


_session: NodeSession | None = None


def current_session() -> NodeSession | None:
    """The session built last (a learning worker tells from it whether a message reused it)."""
    return _session


def session_key(context: Context, content: RecordDict) -> tuple:
    """What the built policy and data depend on: the run, the model configuration, the datasets and the agreed
    statistics. A message with the same key reuses the session (in a learning worker, across messages)."""
    config = content.config_records["config"]
    stats = stats_from_record(content.array_records[STATS_RECORD])
    stats_digest = hashlib.sha256(b"".join(np.ascontiguousarray(v).tobytes() for _, v in sorted(stats.to_record().items())))
    return (context.run_id, str(config["model"]), int(config["seed"]), float(config["eval-fraction"]),
            tuple(dataset_roots(context)), str(context.node_config.get("device", "cpu")), stats_digest.hexdigest())


def session(context: Context, content: RecordDict) -> NodeSession:
    global _session
    config = content.config_records["config"]
    key = session_key(context, content)
    if _session is None or _session.key != key:
        _session = None  # let the previous run's policy and frames go before building the next
        _, model, seed, eval_fraction, roots, device, _ = key
        stats = stats_from_record(content.array_records[STATS_RECORD])
        bundle = build_federated_policy(model, device, roots[0], stats, seed)
        train, held_out = held_out_data(roots, bundle.policy.config, eval_fraction,
                                        cache=frame_cache(context, bundle, list(roots)))
        _session = NodeSession(key, bundle, train[0] if len(train) == 1 else ConcatData(train), held_out, stats)
    if frozen_sha256(_session.bundle.policy) != config["frozen-sha256"]:
        raise ValueError("this node's frozen model weights differ from the server's (model or library version mismatch)")
    return _session


def frame_cache(context: Context, bundle: PolicyBundle, roots: list[Path]) -> FrameCache:
    """Decoded frames at the policy's input size, kept on disk beside the policy store: without a learning
    worker Flower starts a ClientApp process per message, so an in-memory cache alone would decode every
    episode again each round."""
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


def nan_stats(stats: SufficientStats) -> SufficientStats:
    """Drill 'stats-nan': the same statistics with NaN means and sums of squares."""
    return SufficientStats({
        name: dataclasses.replace(fs, mean=np.full_like(fs.mean, np.nan), m2=np.full_like(fs.m2, np.nan))
        for name, fs in stats.features.items()})


def query_content(content: RecordDict, context: Context) -> RecordDict:
    """The statistics reply (the query carries nothing the node needs beyond asking)."""
    stats = combine([from_dataset(root) for root in dataset_roots(context)])
    if drill(context) == "stats-nan":
        stats = nan_stats(stats)
    return RecordDict({STATS_RECORD: stats_to_record(stats), INFO_RECORD: node_info(context),
                       METRICS_RECORD: MetricRecord({"num-frames": stats.count})})


def train_content(content: RecordDict, context: Context, should_stop: Callable[[], bool],
                  on_step: Callable[[int, float], None] | None = None) -> RecordDict:
    """Train on the round's global until the step budget is spent or `should_stop()`; the reply with the update.
    `on_step(steps_done, loss)` hears every step (the learning worker's progress)."""
    from zk0.learn.trainer import LocalTrainer, TrainerConfig

    node = session(context, content)
    config = content.config_records["config"]
    global_state = checked_global(content)
    trainer = LocalTrainer(node.bundle.policy, node.bundle.preprocessor, node.train_data,
                           TrainerConfig(batch_size=int(config["batch-size"]),
                                         seed=int(config["seed"]) + 7919 * int(config["server-round"])))
    result = trainer.train(global_state, int(config["local-steps"]), lr=float(config["lr"]),
                           mu=float(config["proximal-mu"]), should_stop=should_stop, on_step=on_step)
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
    return RecordDict({UPDATE_RECORD: codec.to_array_record(payload), METRICS_RECORD: MetricRecord(metrics),
                       INFO_RECORD: node_info(context)})


def received_server_metrics(content: RecordDict) -> tuple[dict[str, float], list[str]]:
    """(the finite numbers among the server's metrics an evaluate message carries, what was left out and why).
    A server older than this node sends none; neither that nor a malformed value may cost the node its global."""
    record = content.metric_records.get(SERVER_METRICS_RECORD)
    if record is None:
        return {}, [f"the message carries no {SERVER_METRICS_RECORD!r} metric record (a server older than this node)"]
    valid: dict[str, float] = {}
    left_out: list[str] = []
    for key, value in record.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            valid[key] = float(value)
        else:
            left_out.append(f"{key}={value!r} is not a finite number")
    return valid, left_out


def evaluate_content(content: RecordDict, context: Context) -> RecordDict:
    """Evaluate the round's aggregated model on the held-out split and deliver it to the policy store; the reply
    carries the held-out loss and `eval-seconds`, the time spent evaluating (round-overhead accounting)."""
    from zk0.agent.policy_store import PolicyStore
    from zk0.learn.evaluate import EvalConfig, evaluate_datasets
    from zk0.learn.policy import load_trainable_state

    node = session(context, content)
    config = content.config_records["config"]
    load_trainable_state(node.bundle.policy, checked_global(content))
    started = time.perf_counter()
    metrics: dict[str, float] = {"num-examples": 0}
    if node.held_out:
        cfg = EvalConfig(seed=int(config["seed"]) + 1234)
        losses = evaluate_datasets(node.bundle.policy, node.bundle.preprocessor, node.held_out, cfg)
        metrics = {"loss": losses["composite"], "num-examples": sum(len(d.frame_index()) for d in node.held_out.values())}
    eval_seconds = time.perf_counter() - started
    from_server, left_out = received_server_metrics(content)
    if left_out:
        log.warning("round %s: server metrics left out of the policy store: %s", config["server-round"],
                    "; ".join(left_out))
    store = PolicyStore(Path(str(context.node_config.get("policy-store", "policies"))))
    store.add_from_bundle(node.bundle, run=f"run{context.run_id}", round=int(config["server-round"]), stats=node.stats,
                          server_metrics=from_server, global_sha256=str(config[GLOBAL_SHA256]), node_metrics=metrics)
    keep, max_bytes = context.node_config.get("policy-keep"), context.node_config.get("policy-max-bytes")
    if keep is not None or max_bytes is not None:  # the store's retention (agent config federation.keep_versions)
        store.prune(keep=None if keep is None else int(keep), max_bytes=None if max_bytes is None else int(max_bytes))
    return RecordDict({METRICS_RECORD: MetricRecord({**metrics, "eval-seconds": eval_seconds}),
                       INFO_RECORD: node_info(context)})


# The message kinds a node answers, by the names the learning worker's requests use.
KINDS = ("query", "train", "evaluate")


def work(kind: str, content: RecordDict, context: Context, should_stop: Callable[[], bool],
         on_step: Callable[[int, float], None] | None = None) -> RecordDict:
    """The reply content for a message of `kind` (`should_stop` and `on_step` matter to training only)."""
    if kind == "train":
        return train_content(content, context, should_stop, on_step)
    if kind == "evaluate":
        return evaluate_content(content, context)
    if kind == "query":
        return query_content(content, context)
    raise ValueError(f"unknown message kind {kind!r} (known: {', '.join(KINDS)})")
