"""zk0's federation strategy: Flower's FedProx with per-round scheduled LR/mu, update validation and
optional robust aggregation.

What travels (see zk0.learn.codec): the server sends the global trainable tensors as a plain fp32
`ArrayRecord` plus, in the config, the round's LR, mu (per client), step budget, codec and the
global's SHA-256; a node answers with one self-checking payload. Before anything is averaged each
payload is decoded against the round's global (framing, SHA-256, keys, shapes, dtypes, delta base,
finite values) and its distance to the global is bounded; a refused update is dropped with its
reason logged and recorded, and the round completes with the rest.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedProx
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from zk0.learn import codec
from zk0.learn.federation import GLOBAL_SHA256, METRICS_RECORD, UPDATE_RECORD
from zk0.server.config import ValidationConfig
from zk0.server.schedule import RoundSchedule, ScheduleConfig, ScheduleState, client_mu, schedule_round

log = logging.getLogger("zk0.server")



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
    """One node's part in a round, as recorded in the run's metrics."""

    node_id: int
    lr: float
    mu: float
    metrics: dict[str, float] = field(default_factory=dict)
    accepted: bool = False
    rejected_reason: str = ""
    bytes_in: int = 0


@dataclass
class RoundRecord:
    server_round: int
    schedule: RoundSchedule
    bytes_out: int = 0
    clients: dict[int, ClientRound] = field(default_factory=dict)


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
        sample_size = max(int(len(list(grid.get_node_ids())) * self.fraction_train), self.min_train_nodes)
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, sample_size)
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
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Every sampled node gets the aggregated model with its digest, to check, evaluate and store."""
        if self.fraction_evaluate == 0.0:
            return []
        sample_size = max(int(len(list(grid.get_node_ids())) * self.fraction_evaluate), self.min_evaluate_nodes)
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, sample_size)
        eval_config = {**dict(config), **self.train_config, "server-round": server_round,
                       GLOBAL_SHA256: codec.tensors_sha256(arrays.to_torch_state_dict())}
        return [Message(content=self._content(arrays, eval_config), message_type=MessageType.EVALUATE, dst_node_id=n)
                for n in node_ids]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self.current is not None and self.current.server_round == server_round
        accepted: list[dict[str, torch.Tensor]] = []
        weights: list[float] = []
        for reply in replies:
            node_id = reply.metadata.src_node_id
            client = self.current.clients.setdefault(node_id, ClientRound(node_id, math.nan, math.nan))
            if reply.has_error():
                client.rejected_reason = f"node error: {reply.error.reason}"
                log.warning("round %d: no update from node %d: %s", server_round, node_id, reply.error.reason)
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
                client.rejected_reason = getattr(err, "reason", str(err))
                log.warning("round %d: rejected update from node %d: %s", server_round, node_id, client.rejected_reason)
                continue
            client.accepted = True
            dataset_id = str(reply.content.config_records.get("info", ConfigRecord()).get("dataset-id", ""))
            if dataset_id:
                self._dataset_of_node[node_id] = dataset_id
                if "loss-std" in client.metrics:
                    self.history.client_loss_std[dataset_id] = client.metrics["loss-std"]
            accepted.append(update)
            weights.append(max(client.metrics.get("num-examples", 1.0), 0.0))
        if not accepted:
            log.warning("round %d: no acceptable update; the global model is unchanged", server_round)
            return None, None
        aggregated = aggregate_states(accepted, weights, self.validation.aggregation, self.validation.trim_fraction)
        clients = [c for c in self.current.clients.values() if c.accepted]
        total = sum(weights) or 1.0
        keys = set.intersection(*(set(c.metrics) for c in clients))
        summary = {k: sum(c.metrics[k] * w for c, w in zip(clients, weights)) / total for k in keys if k != "num-examples"}
        summary["num-examples"] = total
        summary["accepted-updates"] = len(accepted)
        return ArrayRecord(aggregated), MetricRecord(summary)
