"""What `zk0 demo` shows: one progress line per agent event worth a line, and at the end one summary row per host
(pure), the table printed from the rows, and the plots (the only I/O here, through zk0.learn.plots).

A host's success before and after comes from its own validation report (`zk0ctl validate`, report.json): the
active policy there is the one the host started from (the base), the candidate is the federation's last global;
"after" is whichever policy the gate left active. Intervals are Wilson's (zk0.agent.validate.wilson_interval),
as the report's own. Bytes are the server's count per node (federated_metrics.json): sent = the host's update
payloads, received = its share of the globals the train messages carried.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from zk0.agent.validate import wilson_interval

BASE_RUN = "base"  # the run name of the base version the demo puts in every host's store (version base-round0)


def event_line(host: str, event: Mapping[str, Any]) -> str | None:
    """The progress line for one agent event, or None for events not worth one (job output, renewals...)."""
    kind = event.get("type")
    if kind == "state" and event.get("previous") is not None:  # None: the agent's own start, already told
        return f"{host}: {event.get('previous')} -> {event.get('state')} ({event.get('reason')})"
    if kind == "round":
        if event.get("run") == BASE_RUN:
            return None  # the demo's own seeding of the base, not a round
        loss = (event.get("node_metrics") or {}).get("loss")
        loss_text = f", held-out loss {loss:.4f}" if isinstance(loss, (int, float)) else ""
        return f"{host}: round {event.get('round')} global arrived as {event.get('version')}{loss_text}"
    if kind == "progress":
        loss = event.get("loss")
        loss_text = f", loss {loss:.4f}" if isinstance(loss, (int, float)) else ""
        return f"{host}: training step {event.get('step')}/{event.get('steps')}{loss_text}"
    if kind == "supernode" and event.get("status") not in (None, "started"):
        return f"{host}: SuperNode {event.get('status')}"
    return None


def rollout_outcome(line: str | None) -> str | None:
    """A rollout episode's result from its report line (`... ended: time success=False`): 'success' or
    'no success (ended: time)'; the line itself if it has another shape."""
    match = re.search(r"ended: (\S+) success=(\w+)", line or "")
    if match is None:
        return line
    return "success" if match[2] == "True" else f"no success (ended: {match[1]})"


def success(counts: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Successes, episodes, rate and 95% Wilson interval of one policy's summary in a validation report."""
    if not counts or not counts.get("episodes"):
        return None
    k, n = int(counts["successes"]), int(counts["episodes"])
    low, high = wilson_interval(k, n)
    return {"successes": k, "episodes": n, "rate": k / n, "interval_95": [low, high]}


def node_traffic(rounds: Sequence[Mapping[str, Any]], name: str) -> dict[str, Any]:
    """Bytes `name` sent (its updates) and received (the globals of the train messages sent to it: each round's
    bytes_out is per message times the nodes asked), and its last training loss, from the server's metrics."""
    sent = received = 0
    loss = None
    for entry in rounds:
        clients = entry.get("clients") or {}
        mine = [c for c in clients.values() if c.get("name") == name]
        if not mine:
            continue
        sent += sum(int(c.get("bytes_in") or 0) for c in mine)
        received += int(entry.get("bytes_out") or 0) * len(mine) // len(clients)
        loss = (mine[-1].get("metrics") or {}).get("policy-loss", loss)
    return {"bytes_sent": sent, "bytes_received": received, "local_loss": loss}


def host_row(name: str, tasks: Sequence[str], episodes: int, report: Mapping[str, Any] | None,
             rounds: Sequence[Mapping[str, Any]], rollout: str | None) -> dict[str, Any]:
    """One host's line of the summary (summary.json keeps it whole)."""
    summary = (report or {}).get("summary", {})
    before = success(summary.get("active", {}).get("all"))
    candidate = success(summary.get("candidate", {}).get("all"))
    verdict = (report or {}).get("verdict", {})
    policies = (report or {}).get("policies", {})
    promoted = bool(verdict.get("promoted"))
    return {
        "host": name, "tasks": list(tasks), "episodes": episodes, **node_traffic(rounds, name),
        "before": before, "candidate": candidate, "after": candidate if promoted else before,
        "base": (policies.get("active") or {}).get("version"),
        "candidate_version": (policies.get("candidate") or {}).get("version"),
        "promoted": (policies.get("candidate") or {}).get("version") if promoted else None,
        "verdict": verdict.get("reason"), "rollout": rollout,
    }


def fleet_means(rows: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """The fleet's mean success rate before and after (hosts without a validation left out)."""
    def mean(key: str) -> float | None:
        rates = [row[key]["rate"] for row in rows if row.get(key)]
        return sum(rates) / len(rates) if rates else None

    return {"before": mean("before"), "after": mean("after")}


def _rate(value: Mapping[str, Any] | None) -> str:
    if not value:
        return "n/a"
    low, high = value["interval_95"]
    return f"{value['successes']}/{value['episodes']} [{low:.2f}, {high:.2f}]"


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The summary as a fixed-width text table, one line per host and a fleet line."""
    header = ("host", "tasks", "episodes", "local loss", "success before [95% CI]", "after [95% CI]", "sent",
              "received", "promoted")
    lines = [header]
    for row in rows:
        loss = row.get("local_loss")
        lines.append((row["host"], "+".join(row["tasks"]), str(row["episodes"]),
                      f"{loss:.4f}" if isinstance(loss, (int, float)) else "n/a", _rate(row["before"]),
                      _rate(row["after"]), _size(row["bytes_sent"]), _size(row["bytes_received"]),
                      row["promoted"] or "no"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    means = fleet_means(rows)
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    text.append(f"fleet mean success rate: before {fmt(means['before'])}, after {fmt(means['after'])}")
    return "\n".join(text)


def write_plots(plots: Path, rows: Sequence[Mapping[str, Any]], rounds: Sequence[Mapping[str, Any]]) -> list[Path]:
    """success_before_after.png (per host, 95% Wilson intervals) and server_eval_loss.png (per round)."""
    from zk0.learn.plots import interval_chart, line_chart
    from zk0.server.run_dir import round_series

    plots.mkdir(parents=True, exist_ok=True)
    written = []
    if rows:
        series, labels = {}, {}
        for key, label in (("before", "before (base)"), ("after", "after (active after validation)")):
            values = [row[key] for row in rows]
            series[label] = [(v["rate"], *v["interval_95"]) if v else (None, 0.0, 0.0) for v in values]
            labels[label] = [f"{v['successes']}/{v['episodes']}" if v else "" for v in values]
        path = plots / "success_before_after.png"
        interval_chart(path, [row["host"] for row in rows], series, labels=labels,
                       ylabel="success rate (95% Wilson interval)",
                       title="Validation success per host, before and after the federation")
        written.append(path)
    if rounds:
        path = plots / "server_eval_loss.png"
        series_ = round_series(rounds)
        line_chart(path, series_.rounds, {"server eval loss": series_.server_eval_loss},
                   title="Server evaluation loss per round (held-out data)", xlabel="round", ylabel="loss")
        written.append(path)
    return written
