"""A federated run's directory: what a user keeps, and what a restarted server resumes from.

    RUN/federated_metrics.json        per round: per-client outcome (accepted, rejected, declined, lost,
                                      failed, no reply) with its reason and train metrics, aggregated
                                      train metrics, server eval, lr, mu, bytes in and out; plus the
                                      schedule history a resumed run continues with
    RUN/round_<N>_server_eval.json    the server evaluation after round N (0: the initial model)
    RUN/checkpoints/round_<N>/        the global policy (lerobot save_pretrained + zk0.json + stats)
    RUN/plots/*.png                   server eval loss, client train losses, lr and mu per round

Every file is replaced atomically (write to a temporary name, then rename), and the metrics are
written only after the round's checkpoint, so the last round in the metrics always has one.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

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
        xs = [r["round"] for r in rounds]
        server = {"server eval loss": [r.get("server_eval", {}).get("loss", np.nan) for r in rounds]}
        clients: dict[str, list[float]] = {}
        for i, r in enumerate(rounds):
            for name, c in r.get("clients", {}).items():
                clients.setdefault(f"node {name}", [np.nan] * len(rounds))[i] = c.get("metrics", {}).get("policy-loss", np.nan)
        schedule = {"lr x1e4": [r.get("lr", np.nan) * 1e4 for r in rounds], "mu x100": [r.get("mu", np.nan) * 100 for r in rounds]}
        draw_lines(self.root / "plots" / "server_eval_loss.png", xs, server, "server eval loss per round")
        if clients:
            draw_lines(self.root / "plots" / "client_train_loss.png", xs, clients, "client train loss per round")
        draw_lines(self.root / "plots" / "lr_mu.png", xs, schedule, "scheduled lr and mu")


_COLORS = [(180, 80, 20), (30, 120, 220), (40, 160, 40), (20, 20, 200), (150, 60, 150), (0, 150, 150)]


def draw_lines(path: Path, xs: Sequence[float], series: Mapping[str, Sequence[float]], title: str,
               width: int = 720, height: int = 400) -> None:
    """A line chart PNG drawn with OpenCV (matplotlib is not a zk0 dependency)."""
    import cv2

    image = np.full((height, width, 3), 255, np.uint8)
    margin, font = 48, cv2.FONT_HERSHEY_SIMPLEX
    values = np.array([v for s in series.values() for v in s], dtype=float)
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    span, x_lo, x_span = (hi - lo) or 1.0, min(xs, default=0), (max(xs, default=1) - min(xs, default=0)) or 1
    cv2.rectangle(image, (margin, margin), (width - margin, height - margin), (200, 200, 200), 1)
    for i, (name, ys) in enumerate(series.items()):
        color = _COLORS[i % len(_COLORS)]
        points = [(margin + (x - x_lo) / x_span * (width - 2 * margin), height - margin - (y - lo) / span * (height - 2 * margin))
                  for x, y in zip(xs, ys) if np.isfinite(y)]
        pts = np.round(np.array(points)).astype(np.int32) if points else None
        if pts is not None:
            cv2.polylines(image, [pts], False, color, 2)
            for p in pts:
                cv2.circle(image, tuple(int(c) for c in p), 3, color, -1)
        cv2.putText(image, name, (width - margin - 170, margin + 16 + 16 * i), font, 0.42, color, 1)
    cv2.putText(image, title, (margin, 28), font, 0.55, (0, 0, 0), 1)
    cv2.putText(image, f"{hi:.4g}", (2, margin + 4), font, 0.38, (0, 0, 0), 1)
    cv2.putText(image, f"{lo:.4g}", (2, height - margin), font, 0.38, (0, 0, 0), 1)
    cv2.putText(image, f"round {x_lo}", (margin, height - margin + 18), font, 0.38, (0, 0, 0), 1)
    cv2.putText(image, f"{max(xs, default=0)}", (width - margin - 20, height - margin + 18), font, 0.38, (0, 0, 0), 1)
    cv2.imwrite(str(path), image)
