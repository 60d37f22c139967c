"""A federated run's directory: what a user keeps, and what a restarted server resumes from.

    RUN/federated_metrics.json        per round: per-client name and outcome (accepted, rejected, declined,
                                      lost, failed, no reply) with its reason and train metrics, aggregated
                                      train metrics, server eval, lr, mu, bytes in and out; each node's
                                      answer to the statistics query (normalization.nodes); plus the
                                      history a resumed run continues with (schedule, nodes' datasets)
    RUN/round_<N>_server_eval.json    the server evaluation after round N (0: the initial model)
    RUN/checkpoints/round_<N>/        the global policy (lerobot save_pretrained + zk0.json + stats)
    RUN/plots/*.png                   server eval loss, client train loss per node (by node name), lr and mu
                                      per round (zk0.learn.plots)

Every file is replaced atomically (write to a temporary name, then rename), and the metrics are
written only after the round's checkpoint, so the last round in the metrics always has one.
"""

from __future__ import annotations

import json
import os
import re
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zk0.learn.plots import Panel, line_chart, panel_chart

METRICS_FILE = "federated_metrics.json"


def outcome_summary(outcomes: Sequence[str]) -> str:
    """One round's client outcomes for a log or progress line: '2/3 updates accepted, 1 lost'."""
    counts = Counter(outcomes)
    accepted = counts.pop("accepted", 0)
    return ", ".join([f"{accepted}/{len(outcomes)} updates accepted", *(f"{n} {o}" for o, n in sorted(counts.items()))])


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    tmp.replace(path)


class RunDir:
    def __init__(self, root: Path):
        self.root = Path(root)
        (self.root / "checkpoints").mkdir(parents=True, exist_ok=True)
        (self.root / "plots").mkdir(exist_ok=True)

    @property
    def metrics_path(self) -> Path:
        return self.root / METRICS_FILE

    def checkpoint_dir(self, server_round: int) -> Path:
        return self.root / "checkpoints" / f"round_{server_round}"

    def load_metrics(self) -> dict[str, Any]:
        if not self.metrics_path.exists():
            return {"rounds": [], "history": {}}
        return json.loads(self.metrics_path.read_text())

    def last_round(self) -> int | None:
        """The last round with both a checkpoint and metrics (the one to resume from), if any."""
        rounds = [entry["round"] for entry in self.load_metrics()["rounds"]]
        saved = {int(m.group(1)) for p in (self.root / "checkpoints").iterdir()
                 if (m := re.fullmatch(r"round_(\d+)", p.name)) and (p / "zk0.json").exists()}
        done = [r for r in rounds if r in saved]
        return max(done) if done else None

    def record_round(self, entry: Mapping[str, Any], history: Mapping[str, Any], run_info: Mapping[str, Any]) -> None:
        """Append (or replace, on a re-run round) one round's entry and write its server eval file."""
        metrics = self.load_metrics()
        rounds = [r for r in metrics["rounds"] if r["round"] != entry["round"]] + [dict(entry)]
        rounds.sort(key=lambda r: r["round"])
        _write_json(self.root / f"round_{entry['round']}_server_eval.json",
                    {"round": entry["round"], **entry.get("server_eval", {})})
        _write_json(self.metrics_path, {**metrics, **run_info, "rounds": rounds, "history": dict(history)})
        self.plot(rounds)

    def plot(self, rounds: Sequence[Mapping[str, Any]]) -> None:
        series = round_series(rounds)
        plots = self.root / "plots"
        line_chart(plots / "server_eval_loss.png", series.rounds, {"server eval loss": series.server_eval_loss},
                   title="Server evaluation loss (held-out data)", xlabel="round", ylabel="loss")
        if series.client_train_loss:
            line_chart(plots / "client_train_loss.png", series.rounds, series.client_train_loss,
                       title="Client training loss per node", xlabel="round", ylabel="policy loss")
        panel_chart(plots / "lr_mu.png", series.rounds,
                    [Panel({"learning rate": series.lr}, "learning rate", yformat=".1e"),
                     Panel({"proximal mu": series.mu}, "FedProx mu")],
                    title="Scheduled learning rate and FedProx mu", xlabel="round")


@dataclass(frozen=True)
class RoundSeries:
    """What the run's plots show, one value per recorded round (NaN where a round has none)."""

    rounds: list[int]
    server_eval_loss: list[float]
    client_train_loss: dict[str, list[float]]  # by node label
    lr: list[float]
    mu: list[float]


def node_labels(names: Mapping[str, str]) -> dict[str, str]:
    """Plot label by node id: the node's name, else "node <id>"; a name two nodes share gets their ids."""
    labels = {node_id: name or f"node {node_id}" for node_id, name in names.items()}
    shared = {label for label in labels.values() if list(labels.values()).count(label) > 1}
    return {node_id: f"{label} ({node_id})" if label in shared else label for node_id, label in labels.items()}


def round_series(rounds: Sequence[Mapping[str, Any]]) -> RoundSeries:
    """The plotted series of the recorded rounds."""
    nan = float("nan")
    names: dict[str, str] = {}
    for r in rounds:
        for node_id, client in r.get("clients", {}).items():
            names[node_id] = client.get("name") or names.get(node_id, "")
    labels = node_labels(names)
    clients = {label: [nan] * len(rounds) for label in labels.values()}
    for i, r in enumerate(rounds):
        for node_id, client in r.get("clients", {}).items():
            clients[labels[node_id]][i] = client.get("metrics", {}).get("policy-loss", nan)
    return RoundSeries(
        rounds=[r["round"] for r in rounds],
        server_eval_loss=[r.get("server_eval", {}).get("loss", nan) for r in rounds],
        client_train_loss=clients,
        lr=[r.get("lr", nan) for r in rounds],
        mu=[r.get("mu", nan) for r in rounds],
    )


# Issue #13's round overhead target: wall time minus training and evaluation, as a fraction of the round.
TARGET_OVERHEAD_FRACTION = 0.10


def round_figures(entry: Mapping[str, Any]) -> dict[str, float]:
    """One round of `federated_metrics.json`: its train / evaluate phases, the nodes' own training and
    evaluation time within them, and the rest: overhead = phase - node work (Flower delivery and polling,
    ClientApp start, building, encoding), `overhead_fraction` of the round's wall time (bench/round_overhead.py)."""
    train_phase, evaluate_phase = entry["phase_seconds"]["train"], entry["phase_seconds"]["evaluate"]
    node_train = max((c["metrics"].get("train-seconds", 0.0) for c in entry["clients"].values()), default=0.0)
    node_eval = entry.get("client_eval", {}).get("eval-seconds", 0.0)
    train_overhead, evaluate_overhead = train_phase - node_train, evaluate_phase - node_eval
    return {
        "round": entry["round"], "wall_s": entry["seconds"], "train_phase_s": train_phase,
        "evaluate_phase_s": evaluate_phase, "node_train_s": node_train, "node_eval_s": node_eval,
        "train_overhead_s": train_overhead, "evaluate_overhead_s": evaluate_overhead,
        "server_s": entry["seconds"] - train_phase - evaluate_phase,
        "overhead_fraction": (train_overhead + evaluate_overhead) / entry["seconds"],
    }


def summarize_overhead(rounds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-round overhead figures (`round_figures`) of a run's trained rounds, and the means of the rounds after
    the first (warm)."""
    figures = [round_figures(entry) for entry in rounds if entry["round"] > 0]
    warm = figures[1:]
    mean = {key: statistics.fmean(f[key] for f in warm) for key in figures[0] if key != "round"} if warm else {}
    if mean:
        mean["per_message_overhead_s"] = (mean["train_overhead_s"] + mean["evaluate_overhead_s"]) / 2
    return {"rounds": figures, "warm_mean": mean}
