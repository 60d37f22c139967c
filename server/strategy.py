"""zk0's federation strategy: Flower's FedProx with per-round scheduled LR/mu, update validation and
optional robust aggregation.

What travels (see zk0.learn.codec): the server sends the global trainable tensors as a plain fp32
`ArrayRecord` plus, in the config, the round's LR, mu (per client), step budget, codec and the
global's SHA-256; a node answers with one self-checking payload. Before anything is averaged each
payload is decoded against the round's global (framing, SHA-256, keys, shapes, dtypes, delta base,
finite values) and its distance to the global is bounded; a refused update is dropped with its
reason logged and recorded, and the round completes with the rest.

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
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedProx

from zk0.learn import codec
from zk0.learn.federation import DECLINED, GLOBAL_SHA256, INFO_RECORD, METRICS_RECORD, PREEMPTED, UPDATE_RECORD
from zk0.server.config import ValidationConfig
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


def wait_for_nodes(grid: Grid, minimum: int) -> list[int]:
    """The connected nodes, once there are at least `minimum` of them."""
    while len(node_ids := list(grid.get_node_ids())) < minimum:
        log.info("waiting for nodes: %d connected, %d needed", len(node_ids), minimum)
        time.sleep(1.0)
    return node_ids


def sample_nodes(grid: Grid, min_available: int, fraction: float, min_sampled: int) -> list[int]:
    """`fraction` of the connected nodes (at least `min_sampled`, at most all), once `min_available` are connected.

    One listing serves both the count and the sample: Flower's own helper lists twice and, when a node
    drops out in between, waits for a node count that no longer exists.
    """
    node_ids = wait_for_nodes(grid, min_available)
    return random.sample(node_ids, min(len(node_ids), max(int(len(node_ids) * fraction), min_sampled)))


class UpdateRejected(ValueError):
    """An update the server refuses; `reason` is the one line that is logged and recorded."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def state_norm_distance(update: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of (update - reference) over all tensors, in float64."""
    total = 0.0
    for key, value in update.items():
        total += float(torch.sum((value.double() - reference[key].double()) ** 2))
    return math.sqrt(total)


def validate_update(payload: bytes, global_state: Mapping[str, torch.Tensor], max_norm: float | None) -> dict[str, torch.Tensor]:
    """Decoded update tensors, or `UpdateRejected` with the reason (codec checks, then the norm bound)."""
    try:
        update = codec.decode(payload, global_state)
    except codec.CodecError as err:
        raise UpdateRejected(err.reason) from None
    if max_norm is not None:
        distance = state_norm_distance(update, global_state)
        if distance > max_norm:
            raise UpdateRejected(f"update is {distance:.4g} from the global (L2), above the bound {max_norm:.4g}")
    return update


def aggregate_states(
    updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], method: str, trim_fraction: float = 0.2
) -> dict[str, torch.Tensor]:
    """Combine validated updates: example-weighted mean, or coordinate-wise trimmed mean / median.

    The robust rules ignore weights on purpose: a node could inflate its example count to dominate.
    Trimmed mean drops floor(trim_fraction * n) values from each end per coordinate.
    """
    if not updates:
        raise ValueError("no updates to aggregate")
    if len(weights) != len(updates) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError("weights must be one non-negative number per update, not all zero")
    out: dict[str, torch.Tensor] = {}
    for key in updates[0]:
        stacked = torch.stack([u[key].to(torch.float64) for u in updates])
        if method == "fedavg":
            w = torch.tensor(weights, dtype=torch.float64).reshape(-1, *[1] * (stacked.dim() - 1))
            value = (stacked * w).sum(0) / w.sum()
        elif method == "median":
            value = stacked.median(0).values if len(updates) % 2 else stacked.quantile(0.5, dim=0)
        elif method == "trimmed-mean":
            cut = int(trim_fraction * len(updates))
            ordered = stacked.sort(0).values
            value = ordered[cut:len(updates) - cut].mean(0)
        else:
            raise ValueError(f"unknown aggregation {method!r}")
        out[key] = value.to(updates[0][key].dtype)
    return out


@dataclass
class ClientRound:
    """One node's part in a round, as recorded in the run's metrics (outcomes: see the module docstring)."""

    node_id: int
    lr: float
    mu: float
    metrics: dict[str, float] = field(default_factory=dict)
    outcome: Outcome = Outcome.NO_REPLY
    reason: str = ""
    bytes_in: int = 0

    @property
    def accepted(self) -> bool:
        return self.outcome == Outcome.ACCEPTED


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
    """What the schedule needs from past rounds; saved and restored with the run for resume."""

    eval_losses: list[float] = field(default_factory=list)  # server eval loss after each finished round
    schedule_state: ScheduleState = field(default_factory=ScheduleState)
    client_loss_std: dict[str, float] = field(default_factory=dict)  # by dataset id, last round seen

    def to_json(self) -> dict[str, Any]:
        return {"eval_losses": self.eval_losses, "lr_scale": self.schedule_state.lr_scale,
                "client_loss_std": self.client_loss_std}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FederationHistory:
        return cls(list(data.get("eval_losses", [])), ScheduleState(float(data.get("lr_scale", 1.0))),
                   dict(data.get("client_loss_std", {})))


def _array_record_bytes(record: ArrayRecord) -> int:
    return sum(len(array.data) for array in record.values())


class Zk0FedProx(FedProx):
    """FedProx whose LR and mu come from the schedule, with validated, optionally robust aggregation."""

    def __init__(self, schedule: ScheduleConfig, validation: ValidationConfig, train_config: Mapping[str, Any],
                 history: FederationHistory | None = None, min_nodes: int = 2, fraction_train: float = 1.0,
                 fraction_evaluate: float = 1.0):
        super().__init__(fraction_train=fraction_train, fraction_evaluate=fraction_evaluate,
                         # evaluation is best effort: it never waits for more nodes than are connected
                         min_train_nodes=min_nodes, min_evaluate_nodes=1,
                         min_available_nodes=min_nodes, proximal_mu=schedule.base_mu)
        self.schedule = schedule
        self.validation = validation
        self.train_config = dict(train_config)  # local-steps, batch-size, codec, ... sent every round
        self.history = history or FederationHistory()
        self.current: RoundRecord | None = None
        self._global: dict[str, torch.Tensor] = {}
        self._global_sha256 = ""
        self._dataset_of_node: dict[int, str] = {}
        # Sent with every train and evaluate message: the agreed normalization statistics, model identity.
        self.broadcast_records: dict[str, ArrayRecord] = {}
        self.broadcast_config: dict[str, Any] = {}

    def _content(self, arrays: ArrayRecord, config: Mapping[str, Any]) -> RecordDict:
        return RecordDict({self.arrayrecord_key: arrays, **self.broadcast_records,
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
        std = self.history.client_loss_std.get(self._dataset_of_node.get(node_id, ""))
        return client_mu(self.current.schedule.mu, std, self.schedule)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        record = self.start_round(server_round, arrays)
        decision = record.schedule
        node_ids = sample_nodes(grid, self.min_available_nodes, self.fraction_train, self.min_train_nodes)
        log.info("round %d: lr %.3g (%s), mu %.3g, %d nodes", server_round, decision.lr, decision.reason,
                 decision.mu, len(node_ids))
        messages = []
        for node_id in node_ids:
            mu = self.client_mu(node_id)
            node_config = {**dict(config), **self.train_config, "server-round": server_round,
                           "lr": decision.lr, "proximal-mu": mu, GLOBAL_SHA256: self._global_sha256}
            record.clients[node_id] = ClientRound(node_id=node_id, lr=decision.lr, mu=mu)
            log.info("round %d: node %d trains with lr %.3g, mu %.3g%s", server_round, node_id, decision.lr, mu,
                     " (raised: unstable local loss)" if mu > decision.mu else "")
            content = self._content(arrays, node_config)
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node_id))
        record.bytes_out = _array_record_bytes(arrays) * len(messages)
        record.sent = messages
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Every sampled node gets the aggregated model with its digest, to check, evaluate and store."""
        if self.fraction_evaluate == 0.0:
            return []
        node_ids = sample_nodes(grid, self.min_available_nodes, self.fraction_evaluate, self.min_evaluate_nodes)
        eval_config = {**dict(config), **self.train_config, "server-round": server_round,
                       GLOBAL_SHA256: codec.tensors_sha256(arrays.to_torch_state_dict())}
        return [Message(content=self._content(arrays, eval_config), message_type=MessageType.EVALUATE, dst_node_id=n)
                for n in node_ids]

    def _no_update(self, server_round: int, client: ClientRound, error: Error) -> None:
        client.outcome = Outcome.LOST if error.code in _LOST_CODES else Outcome.FAILED
        client.reason = error.reason
        if client.outcome == Outcome.LOST:
            log.warning("round %d: node %d lost, the round goes on without it: %s", server_round, client.node_id,
                        error.reason)
        else:
            log.warning("round %d: no update from node %d: %s", server_round, client.node_id, error.reason)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self.current is not None and self.current.server_round == server_round
        accepted: list[dict[str, torch.Tensor]] = []
        weights: list[float] = []
        clients: list[ClientRound] = []  # the accepted ones, in the order of `accepted`
        node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in self.current.sent if m.metadata.message_id}
        for reply in replies:
            node_id = node_of.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            client = self.current.clients.setdefault(node_id, ClientRound(node_id, math.nan, math.nan))
            if reply.has_error():
                self._no_update(server_round, client, reply.error)
                continue
            info = reply.content.config_records.get(INFO_RECORD, ConfigRecord())
            if DECLINED in info:
                client.outcome, client.reason = Outcome.DECLINED, str(info[DECLINED])
                log.info("round %d: node %d declined to train: %s", server_round, node_id, client.reason)
                continue
            try:
                payload = codec.from_array_record(reply.content.array_records.get(UPDATE_RECORD, ArrayRecord()))
                client.bytes_in = len(payload)
                metrics = reply.content.metric_records.get(METRICS_RECORD)
                if metrics is None:
                    raise UpdateRejected("reply carries no metrics")
                client.metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
                update = validate_update(payload, self._global, self.validation.max_update_norm)
            except (UpdateRejected, codec.CodecError) as err:
                client.outcome, client.reason = Outcome.REJECTED, getattr(err, "reason", str(err))
                log.warning("round %d: rejected update from node %d: %s", server_round, node_id, client.reason)
                continue
            client.outcome = Outcome.ACCEPTED
            if PREEMPTED in info:
                client.reason = f"partial update ({client.metrics.get('steps', 0):.0f} steps): {info[PREEMPTED]}"
                log.info("round %d: node %d sent a %s", server_round, node_id, client.reason)
            dataset_id = str(info.get("dataset-id", ""))
            if dataset_id:
                self._dataset_of_node[node_id] = dataset_id
                if "loss-std" in client.metrics:
                    self.history.client_loss_std[dataset_id] = client.metrics["loss-std"]
            accepted.append(update)
            weights.append(max(client.metrics.get("num-examples", 1.0), 0.0))
            clients.append(client)
        for client in self.current.clients.values():
            if client.outcome == Outcome.NO_REPLY:
                log.warning("round %d: no reply from node %d within the round timeout", server_round, client.node_id)
        if not accepted:
            log.warning("round %d: no acceptable update; the global model is unchanged", server_round)
            return None, None
        aggregated = aggregate_states(accepted, weights, self.validation.aggregation, self.validation.trim_fraction)
        total = sum(weights) or 1.0
        keys = set.intersection(*(set(c.metrics) for c in clients))
        summary = {k: sum(c.metrics[k] * w for c, w in zip(clients, weights)) / total for k in keys if k != "num-examples"}
        summary["num-examples"] = total
        summary["accepted-updates"] = len(accepted)
        return ArrayRecord(aggregated), MetricRecord(summary)
