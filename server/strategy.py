"""zk0's federation strategy: Flower's FedProx with per-round scheduled LR/mu, update validation and
optional robust aggregation.

What travels (see zk0.learn.codec): the server sends the global trainable tensors as a plain fp32
`ArrayRecord` plus, in the config, the round's LR, mu (per client), step budget, codec and the
global's SHA-256 (an evaluate message also carries the server's metrics of its global,
SERVER_METRICS_RECORD); a node answers with one self-checking payload. Before anything is averaged each
payload is decoded against the round's global (framing, SHA-256, keys, shapes, dtypes, delta base,
finite values), its claimed example count must be a positive number, and its L2 distance to the
global is bounded (`norm_rejections`): at most `validation.norm_bound_multiple` times the round's
reference distance (the lower median of the round's decoded updates, so that with two nodes one huge
update cannot raise its own bound; a round with one update uses the previous round's median accepted
distance per unit of LR x optimizer step, times the lone update's LR x steps (capped at the round's
local steps), since a warm restart or boost moves every update, and a node that trained more steps (a
partial round before, a full one now) moves further
that much) and, optionally, at most `validation.max_update_norm`. A refused update is dropped with its
reason logged and recorded, and the round completes with the rest.

Aggregation: FedAvg weights each update by its node's example count, capped at what the round asked
for (local-steps x batch-size; a capped claim is logged and noted in the client's reason, the update
stays accepted). Trimmed mean drops max(1, floor(trim_fraction * n)) values per side and coordinate
from 3 updates on; with fewer it is the plain mean, with a logged warning. Median ignores weights.

Nodes are waited for at most the round timeout (zk0.server.node_wait): too few connected by then ends the
run with `FederationAborted`, which the ServerApp logs as one line.

Every node sent a train message ends the round with one outcome, logged and recorded with its reason:
accepted (aggregated; a partial update from a node whose training lease was revoked mid-round is noted
as preempted), rejected (failed validation), declined (the node did not train: its agent refused the
training lease), lost (the node went away: Flower answers for a SuperNode whose heartbeats stopped),
failed (its ClientApp raised or crashed) or no reply (nothing within the round timeout). Only accepted
updates are aggregated; a round without one leaves the global unchanged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedProx

from zk0.learn import codec
from zk0.learn.federation import (
    DATASET_ID, DECLINED, GLOBAL_SHA256, INFO_RECORD, METRICS_RECORD, NODE_NAME, PREEMPTED, UPDATE_RECORD,
)
from zk0.learn.records import SERVER_METRICS_RECORD
from zk0.server.aggregation import (
    MIN_TRIMMED, UpdateRejected, aggregate_states, decode_update, example_cap, example_weight, lower_median,
    norm_rejections, state_norm_distance, update_steps,
)
from zk0.server.config import ValidationConfig
from zk0.server.node_wait import sample_nodes
from zk0.server.schedule import RoundSchedule, ScheduleConfig, ScheduleState, client_mu, schedule_round

log = logging.getLogger("zk0.server")


class Outcome(StrEnum):
    """How a node's part in a round ended (see the module docstring)."""

    ACCEPTED = "accepted"
    REJECTED = "rejected"
    DECLINED = "declined"
    LOST = "lost"
    FAILED = "failed"
    NO_REPLY = "no reply"


# Flower's error replies for a message whose node (or the message itself) is gone, as opposed to a ClientApp error.
_LOST_CODES = {ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE}


def error_outcome(error: Error) -> Outcome:
    """LOST for Flower's own answer about a node that went away, FAILED for a ClientApp error."""
    return Outcome.LOST if error.code in _LOST_CODES else Outcome.FAILED


def node_label(node_id: int, name: str = "") -> str:
    """How logs name a node: 'node 12 (arm1)', or 'node 12' before its name is known."""
    return f"node {node_id} ({name})" if name else f"node {node_id}"


def match_replies(sent: Iterable[Message], replies: Iterable[Message]) -> Iterator[tuple[int, Message]]:
    """(node id, reply) pairs. Flower's error replies for a node that went away come from the SuperLink
    itself, so a reply is matched to its node through the message it answers (ids given on push)."""
    node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in sent if m.metadata.message_id}
    for reply in replies:
        yield node_of.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id), reply


def node_identity(info: Mapping[str, Any]) -> tuple[str, str]:
    """(dataset id, node name) from a reply's INFO_RECORD; empty strings for what it does not carry."""
    return str(info.get(DATASET_ID, "")), str(info.get(NODE_NAME, ""))


@dataclass
class ClientRound:
    """One node's part in a round, as recorded in the run's metrics (outcomes: see the module docstring)."""

    node_id: int
    lr: float
    mu: float
    name: str = ""  # the node's NODE_NAME, once known
    metrics: dict[str, float] = field(default_factory=dict)
    outcome: Outcome = Outcome.NO_REPLY
    reason: str = ""
    bytes_in: int = 0

    @property
    def accepted(self) -> bool:
        return self.outcome == Outcome.ACCEPTED

    @property
    def label(self) -> str:
        return node_label(self.node_id, self.name)


@dataclass
class RoundRecord:
    server_round: int
    schedule: RoundSchedule
    bytes_out: int = 0
    clients: dict[int, ClientRound] = field(default_factory=dict)
    # The train messages as sent: Grid.send_and_receive gives them their ids, which replies refer to. Flower's
    # own error replies (node unavailable) come from the SuperLink, so only this names the node they concern.
    sent: list[Message] = field(default_factory=list)


@dataclass
class FederationHistory:
    """What the schedule and the validation need from past rounds; saved with the run's metrics for resume."""

    eval_losses: list[float] = field(default_factory=list)  # server eval loss after each finished round
    schedule_state: ScheduleState = field(default_factory=ScheduleState)
    client_loss_std: dict[str, float] = field(default_factory=dict)  # by dataset id, last round seen
    dataset_of_node: dict[int, str] = field(default_factory=dict)  # learned from every reply's INFO_RECORD
    node_names: dict[int, str] = field(default_factory=dict)
    # median accepted update distance of the last round with one, per unit of that round's LR
    update_norm_per_lr_step: float | None = None

    def note_node(self, node_id: int, dataset_id: str, name: str) -> None:
        """Remember what a reply says about its node (empty values leave what is known)."""
        if dataset_id:
            self.dataset_of_node[node_id] = dataset_id
        if name:
            self.node_names[node_id] = name

    def to_json(self) -> dict[str, Any]:
        return {"eval_losses": self.eval_losses, "schedule_state": self.schedule_state.to_json(),
                "client_loss_std": self.client_loss_std,
                "dataset_of_node": {str(k): v for k, v in self.dataset_of_node.items()},
                "node_names": {str(k): v for k, v in self.node_names.items()},
                "update_norm_per_lr_step": self.update_norm_per_lr_step}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FederationHistory:
        per_lr = data.get("update_norm_per_lr_step")
        return cls(
            eval_losses=[float(x) for x in data.get("eval_losses", [])],
            schedule_state=ScheduleState.from_json(data.get("schedule_state", {})),
            client_loss_std={str(k): float(v) for k, v in data.get("client_loss_std", {}).items()},
            dataset_of_node={int(k): str(v) for k, v in data.get("dataset_of_node", {}).items()},
            node_names={int(k): str(v) for k, v in data.get("node_names", {}).items()},
            update_norm_per_lr_step=None if per_lr is None else float(per_lr),
        )


def _array_record_bytes(record: ArrayRecord) -> int:
    return sum(len(array.data) for array in record.values())


class Zk0FedProx(FedProx):
    """FedProx whose LR and mu come from the schedule, with validated, optionally robust aggregation."""

    def __init__(self, schedule: ScheduleConfig, validation: ValidationConfig, train_config: Mapping[str, Any],
                 history: FederationHistory | None = None, min_nodes: int = 2, fraction_train: float = 1.0,
                 fraction_evaluate: float = 1.0, node_timeout_s: float = 3600.0):
        super().__init__(fraction_train=fraction_train, fraction_evaluate=fraction_evaluate,
                         # evaluation is best effort: it never waits for more nodes than are connected
                         min_train_nodes=min_nodes, min_evaluate_nodes=1,
                         min_available_nodes=min_nodes, proximal_mu=schedule.base_mu)
        self.schedule = schedule
        self.validation = validation
        self.train_config = dict(train_config)  # local-steps, batch-size, codec, ... sent every round
        self.history = history or FederationHistory()
        self.node_timeout_s = node_timeout_s  # longest wait for min_nodes connected nodes before a phase
        self.current: RoundRecord | None = None
        self._global: dict[str, torch.Tensor] = {}
        self._global_sha256 = ""
        # Sent with every train and evaluate message: the agreed normalization statistics, model identity.
        self.broadcast_records: dict[str, ArrayRecord] = {}
        self.broadcast_config: dict[str, Any] = {}

    def _content(self, arrays: ArrayRecord, config: Mapping[str, Any],
                 records: Mapping[str, MetricRecord] | None = None) -> RecordDict:
        return RecordDict({self.arrayrecord_key: arrays, **self.broadcast_records, **(records or {}),
                           self.configrecord_key: ConfigRecord({**self.broadcast_config, **config})})

    def start_round(self, server_round: int, arrays: ArrayRecord) -> RoundRecord:
        """Decide the round's LR and mu and remember the global its updates are checked against."""
        decision = schedule_round(server_round, self.history.eval_losses, self.history.schedule_state, self.schedule)
        self.history.schedule_state = decision.state
        self.proximal_mu = decision.mu
        self.current = RoundRecord(server_round, decision)
        self._global = dict(arrays.to_torch_state_dict())
        self._global_sha256 = codec.tensors_sha256(self._global)
        return self.current

    def client_mu(self, node_id: int) -> float:
        """The round's mu, raised for a node whose dataset trained unstably last time."""
        assert self.current is not None
        std = self.history.client_loss_std.get(self.history.dataset_of_node.get(node_id, ""))
        return client_mu(self.current.schedule.mu, std, self.schedule)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        record = self.start_round(server_round, arrays)
        decision = record.schedule
        node_ids = sample_nodes(grid, self.min_available_nodes, self.fraction_train, self.min_train_nodes,
                                self.node_timeout_s)
        log.info("round %d: lr %.3g (%s), mu %.3g, %d nodes", server_round, decision.lr, decision.reason,
                 decision.mu, len(node_ids))
        messages = []
        for node_id in node_ids:
            mu = self.client_mu(node_id)
            node_config = {**dict(config), **self.train_config, "server-round": server_round,
                           "lr": decision.lr, "proximal-mu": mu, GLOBAL_SHA256: self._global_sha256}
            client = ClientRound(node_id=node_id, lr=decision.lr, mu=mu, name=self.history.node_names.get(node_id, ""))
            record.clients[node_id] = client
            log.info("round %d: %s trains with lr %.3g, mu %.3g%s", server_round, client.label, decision.lr, mu,
                     " (raised: unstable local loss)" if mu > decision.mu else "")
            content = self._content(arrays, node_config)
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node_id))
        record.bytes_out = _array_record_bytes(arrays) * len(messages)
        record.sent = messages
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid,
                           server_metrics: Mapping[str, float] | None = None) -> Iterable[Message]:
        """Every sampled node gets the aggregated model with its digest, to check, evaluate and store, and
        `server_metrics` (zk0.server.evaluation.server_metrics) as SERVER_METRICS_RECORD for its store to keep."""
        if self.fraction_evaluate == 0.0:
            return []
        # best effort: a node lost since training must not hold up (or, after the timeout, end) the round
        node_ids = sample_nodes(grid, self.min_evaluate_nodes, self.fraction_evaluate, self.min_evaluate_nodes,
                                self.node_timeout_s)
        eval_config = {**dict(config), **self.train_config, "server-round": server_round,
                       GLOBAL_SHA256: codec.tensors_sha256(arrays.to_torch_state_dict())}
        records = {} if server_metrics is None else {SERVER_METRICS_RECORD: MetricRecord(dict(server_metrics))}
        return [Message(content=self._content(arrays, eval_config, records), message_type=MessageType.EVALUATE,
                        dst_node_id=n) for n in node_ids]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Flower's weighted mean of the nodes' eval metrics; what the replies say about their nodes is kept."""
        replies = list(replies)
        for reply in replies:
            if not reply.has_error():
                info = reply.content.config_records.get(INFO_RECORD, ConfigRecord())
                self.history.note_node(reply.metadata.src_node_id, *node_identity(info))
        return super().aggregate_evaluate(server_round, replies)

    def _no_update(self, server_round: int, client: ClientRound, error: Error) -> None:
        client.outcome, client.reason = error_outcome(error), error.reason
        if client.outcome == Outcome.LOST:
            log.warning("round %d: %s lost, the round goes on without it: %s", server_round, client.label,
                        error.reason)
        else:
            log.warning("round %d: no update from %s: %s", server_round, client.label, error.reason)

    def _reject(self, server_round: int, client: ClientRound, reason: str) -> None:
        client.outcome, client.reason = Outcome.REJECTED, reason
        log.warning("round %d: rejected update from %s: %s", server_round, client.label, reason)

    def _decode(self, client: ClientRound, reply: Message) -> tuple[dict[str, torch.Tensor], float, str]:
        """(update, aggregation weight, weight note) of a train reply, or `UpdateRejected`."""
        payload = codec.from_array_record(reply.content.array_records.get(UPDATE_RECORD, ArrayRecord()))
        client.bytes_in = len(payload)
        metrics = reply.content.metric_records.get(METRICS_RECORD)
        if metrics is None:
            raise UpdateRejected("reply carries no metrics")
        client.metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        weight, note = example_weight(client.metrics.get("num-examples"), example_cap(self.train_config))
        return decode_update(payload, self._global), weight, note

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self.current is not None and self.current.server_round == server_round
        decoded: list[tuple[ClientRound, dict[str, torch.Tensor], float, str]] = []
        for node_id, reply in match_replies(self.current.sent, replies):
            client = self.current.clients.setdefault(node_id, ClientRound(node_id, math.nan, math.nan))
            if reply.has_error():
                self._no_update(server_round, client, reply.error)
                continue
            info = reply.content.config_records.get(INFO_RECORD, ConfigRecord())
            dataset_id, name = node_identity(info)
            self.history.note_node(node_id, dataset_id, name)
            client.name = name or client.name
            if DECLINED in info:
                client.outcome, client.reason = Outcome.DECLINED, str(info[DECLINED])
                log.info("round %d: %s declined to train: %s", server_round, client.label, client.reason)
                continue
            try:
                update, weight, note = self._decode(client, reply)
            except (UpdateRejected, codec.CodecError) as err:
                self._reject(server_round, client, getattr(err, "reason", str(err)))
                continue
            if PREEMPTED in info:
                note = "; ".join(filter(None, [f"partial update ({client.metrics.get('steps', 0):.0f} steps): "
                                               f"{info[PREEMPTED]}", note]))
            decoded.append((client, update, weight, note))

        lr = self.current.schedule.lr
        asked = self.train_config.get("local-steps")
        steps = {c.node_id: update_steps(c.metrics.get("steps"), None if asked is None else int(asked))
                 for c, *_ in decoded}
        distances = [state_norm_distance(update, self._global) for _, update, _, _ in decoded]
        per_lr_step = self.history.update_norm_per_lr_step
        previous = None if per_lr_step is None or len(decoded) != 1 else per_lr_step * lr * steps[decoded[0][0].node_id]
        _, verdicts = norm_rejections(distances, self.validation.norm_bound_multiple, self.validation.max_update_norm,
                                      previous)
        accepted: list[tuple[ClientRound, dict[str, torch.Tensor], float, float]] = []
        for (client, update, weight, note), distance, verdict in zip(decoded, distances, verdicts):
            if verdict is not None:
                self._reject(server_round, client, verdict)
                continue
            client.outcome, client.reason = Outcome.ACCEPTED, note
            if note:
                log.info("round %d: %s accepted: %s", server_round, client.label, note)
            if "loss-std" in client.metrics and (dataset_id := self.history.dataset_of_node.get(client.node_id)):
                self.history.client_loss_std[dataset_id] = client.metrics["loss-std"]
            accepted.append((client, update, weight, distance))
        for client in self.current.clients.values():
            if client.outcome == Outcome.NO_REPLY:
                log.warning("round %d: no reply from %s within the round timeout", server_round, client.label)
        if not accepted:
            log.warning("round %d: no acceptable update; the global model is unchanged", server_round)
            return None, None
        self.history.update_norm_per_lr_step = lower_median(
            [distance / (lr * steps[client.node_id]) for client, *_, distance in accepted])
        if self.validation.aggregation == "trimmed-mean" and len(accepted) < MIN_TRIMMED:
            log.warning("round %d: %d accepted updates, too few to trim: plain mean", server_round, len(accepted))
        clients, updates, weights = [a[0] for a in accepted], [a[1] for a in accepted], [a[2] for a in accepted]
        aggregated = aggregate_states(updates, weights, self.validation.aggregation, self.validation.trim_fraction)
        total = sum(weights)
        keys = set.intersection(*(set(c.metrics) for c in clients))
        summary = {k: sum(c.metrics[k] * w for c, w in zip(clients, weights)) / total for k in keys if k != "num-examples"}
        summary["num-examples"] = total
        summary["accepted-updates"] = len(accepted)
        return ArrayRecord(aggregated), MetricRecord(summary)
