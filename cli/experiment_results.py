"""The experiment's record: results.json's entries, the issue's done-when checks, results.md and the plots.

Pure except `write_plots`; the per-round overhead arithmetic is zk0.server.run_dir's, shared with
bench/round_overhead.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from zk0.cli.experiment_plan import BASE, CENTRAL, FEDAVG, FEDERATED, FEDPROX, LOCAL_PREFIX, ExperimentConfig

HOSTS_COLUMN = "hosts' tasks"
TARGETS = {"central_success": 0.70, "fedprox_of_central": 0.90, "retention_points": 0.10}
# Success rates are ratios of counts: 9/100 against 0.9 x 10/100 is a tie, which float rounding must not break.
TIE = 1e-9


def task_entry(summary: Mapping[str, Any]) -> dict[str, Any]:
    """What results.json keeps of a zk0.agent.validate summary."""
    return {"successes": summary["successes"], "episodes": summary["episodes"], "success_rate": summary["success_rate"],
            "interval_95": summary["interval_95"], "time_to_success_s": summary["time_to_success_s"]["median"],
            "table_contact_episodes": summary["table_contacts"]["episodes"]}


def pooled(entries: Mapping[str, Mapping[str, Any]], tasks: Sequence[str]) -> dict[str, Any] | None:
    """Successes over several tasks' episodes with their Wilson interval; None for no tasks."""
    from zk0.agent.validate import wilson_interval

    if not tasks:
        return None
    successes = sum(entries[t]["successes"] for t in tasks)
    episodes = sum(entries[t]["episodes"] for t in tasks)
    return {"successes": successes, "episodes": episodes, "success_rate": successes / episodes if episodes else None,
            "interval_95": list(wilson_interval(successes, episodes)), "tasks": list(tasks)}


def arm_groups(arm: str, config: ExperimentConfig) -> dict[str, list[str]]:
    """The pooled groups an arm is reported on: the hosts' tasks, the unseen ones, and for a local-only arm its
    own host's tasks and the other hosts' tasks it never saw."""
    groups = {HOSTS_COLUMN: list(config.host_tasks), "unseen tasks": list(config.unseen_tasks)}
    if arm.startswith(LOCAL_PREFIX):
        own = next(h for h in config.hosts if LOCAL_PREFIX + h.name == arm).tasks
        groups["own tasks"] = list(own)
        groups["other hosts' tasks"] = [t for t in config.host_tasks if t not in own]
    return groups


def success_entry(summary: Mapping[str, Any], arm: str, config: ExperimentConfig) -> dict[str, Any]:
    """An arm's per-task entries and its pooled groups, from zk0.agent.validate.summaries' entry for it."""
    tasks = {task: task_entry(s) for task, s in summary["per_task"].items()}
    return {"tasks": tasks, "groups": {name: pooled(tasks, group) for name, group in arm_groups(arm, config).items()
                                       if group}}


def success_curve(base: Mapping[str, Any], midway: Mapping[int, Mapping[str, Any]], final: Mapping[str, Any],
                  config: ExperimentConfig) -> list[dict[str, Any]]:
    """A federated arm's success on the hosts' tasks by round: round 0 is the base (`success_entry`s of the base and
    of the arm's last round give the ends; `midway` maps a round to zk0.agent.validate.summaries' entry)."""
    points = {0: base["groups"][HOSTS_COLUMN], config.rounds: final["groups"][HOSTS_COLUMN]}
    for server_round, summary in midway.items():
        points[server_round] = pooled({t: task_entry(s) for t, s in summary["per_task"].items()}, config.host_tasks)
    return [{"round": r, **points[r]} for r in sorted(points)]


def federated_figures(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Bytes moved and per-round server loss of a federated run's federated_metrics.json."""
    rounds = [r for r in metrics["rounds"] if r["round"] > 0]
    return {"bytes_moved": sum(r.get("bytes_in", 0) + r.get("bytes_out", 0) for r in rounds),
            "bytes_in": sum(r.get("bytes_in", 0) for r in rounds), "bytes_out": sum(r.get("bytes_out", 0) for r in rounds),
            "rounds": len(rounds),
            "server_eval_loss": {str(r["round"]): r.get("server_eval", {}).get("loss") for r in metrics["rounds"]},
            "outcomes": sorted({c.get("outcome", "") for r in rounds for c in r.get("clients", {}).values()})}


def round_overhead(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The per-round overhead figures (round wall minus node training and evaluation) of a run."""
    from zk0.server.run_dir import TARGET_OVERHEAD_FRACTION, summarize_overhead

    return {**summarize_overhead(metrics["rounds"]), "target_fraction": TARGET_OVERHEAD_FRACTION}


def _rate(results: Mapping[str, Any], arm: str, group: str) -> float | None:
    entry = results["arms"].get(arm, {}).get("success", {}).get("groups", {}).get(group)
    return None if entry is None else entry["success_rate"]


def criteria(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Issue #13's done-when checks on a run's results: each {met, detail}."""
    central, fedprox, fedavg = (_rate(results, a, HOSTS_COLUMN) for a in (CENTRAL, FEDPROX, FEDAVG))
    checks: dict[str, dict[str, Any]] = {
        "central_at_least_70pct": {"met": central is not None and central + TIE >= TARGETS["central_success"],
                                   "detail": f"centralized {central} on the hosts' tasks (target >= 0.70)"},
        "fedprox_at_least_90pct_of_central": {
            "met": None not in (central, fedprox) and fedprox + TIE >= TARGETS["fedprox_of_central"] * central
            and central > 0,
            "detail": f"fedprox {fedprox} vs 0.9 x centralized {central}"},
        "fedprox_at_least_fedavg": {"met": None not in (fedprox, fedavg) and fedprox >= fedavg,
                                    "detail": f"fedprox {fedprox} vs fedavg {fedavg} on the hosts' tasks"},
    }
    base_unseen = _rate(results, BASE, "unseen tasks")
    kept = {arm: _rate(results, arm, "unseen tasks") for arm in (CENTRAL, *FEDERATED)}
    checks["unseen_task_within_10_points_of_base"] = {
        "met": base_unseen is not None and all(
            v is not None and abs(v - base_unseen) <= TARGETS["retention_points"] + TIE for v in kept.values()),
        "detail": f"base {base_unseen}; " + ", ".join(f"{arm} {v}" for arm, v in kept.items())}
    local = {}
    for arm, entry in results["arms"].items():
        others = entry.get("success", {}).get("groups", {}).get("other hosts' tasks")
        if arm.startswith(LOCAL_PREFIX) and others:
            fed = pooled(results["arms"][FEDPROX]["success"]["tasks"], others["tasks"])
            local[arm] = (others["success_rate"], fed["success_rate"])
    checks["local_worse_than_fedprox_on_others_tasks"] = {
        "met": bool(local) and all(mine < fed for mine, fed in local.values()),
        "detail": ", ".join(f"{arm} {mine} vs fedprox {fed}" for arm, (mine, fed) in local.items())}
    return checks


def _cell(entry: Mapping[str, Any] | None) -> str:
    if entry is None:
        return "-"
    low, high = entry["interval_95"]
    return f"{entry['success_rate']:.0%} [{low:.0%}, {high:.0%}] ({entry['successes']}/{entry['episodes']})"


def _megabytes(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e6:.2f} MB"


def markdown(results: Mapping[str, Any]) -> str:
    """results.md: success per arm and task (95 % Wilson intervals), budgets, round overhead and the checks."""
    tasks = results["tasks"]
    groups = [HOSTS_COLUMN, "unseen tasks", "own tasks", "other hosts' tasks"]
    lines = [f"# zk0 experiment fl-vs-central{' (--quick)' if results['quick'] else ''}", "",
             f"Base: `{results['base']['name']}` ({results['base']['checkpoint']}). Hosts: "
             + "; ".join(f"{name}: {', '.join(h['tasks'])} ({h['episodes']} episodes)"
                         for name, h in results["hosts"].items())
             + f". Unseen: {', '.join(results['unseen_tasks'])}. Success on {results['eval_episodes']} validation "
               f"episodes per task and arm (seeds {results['seeds']['validation']}), 95 % Wilson intervals.", "",
             "| arm | " + " | ".join([*tasks, *groups]) + " | steps | wall | bytes moved |",
             "|---|" + "---|" * (len(tasks) + len(groups) + 3)]
    for arm, entry in results["arms"].items():
        success = entry["success"]
        cells = [_cell(success["tasks"].get(t)) for t in tasks] + [_cell(success["groups"].get(g)) for g in groups]
        wall = entry.get("wall_s")
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {entry.get('steps', 0)} | "
                     f"{'-' if wall is None else f'{wall:.0f} s'} | {_megabytes(entry.get('bytes_moved'))} |")
    runtime = results["runtime"]
    lines += ["", f"Federated runtime: {runtime['name']} ({runtime['why']}).", "",
              "| federated arm | round wall (warm mean) | node train | node eval | overhead | overhead / round |",
              "|---|---|---|---|---|---|"]
    for arm in FEDERATED:
        mean = results["arms"].get(arm, {}).get("round_overhead", {}).get("warm_mean") or {}
        if mean:
            overhead = mean["train_overhead_s"] + mean["evaluate_overhead_s"]
            lines.append(f"| {arm} | {mean['wall_s']:.2f} s | {mean['node_train_s']:.2f} s | {mean['node_eval_s']:.2f} s"
                         f" | {overhead:.2f} s | {mean['overhead_fraction']:.1%} |")
    lines += ["", "| check (issue #13) | met | detail |", "|---|---|---|"]
    lines += [f"| {name} | {'yes' if c['met'] else 'no'} | {c['detail']} |" for name, c in results["criteria"].items()]
    lines += ["", f"Total {results['elapsed_s'] / 60:.1f} min; load average {results['load_average']}."]
    return "\n".join(lines) + "\n"


def write_plots(results: Mapping[str, Any], plots_dir: Path) -> list[Path]:
    """plots/success_by_task.png (every arm per task and pooled group, with intervals) and
    plots/success_vs_round.png (federated arms on the hosts' tasks, round 0 being the base)."""
    from zk0.learn.plots import interval_chart

    plots_dir.mkdir(parents=True, exist_ok=True)
    groups = [*results["tasks"], HOSTS_COLUMN]
    series, labels = {}, {}
    for arm, entry in results["arms"].items():
        found = [entry["success"]["tasks"].get(g) or entry["success"]["groups"].get(g) for g in groups]
        series[arm] = [(e["success_rate"], *e["interval_95"]) if e else (None, 0.0, 0.0) for e in found]
        labels[arm] = [f"{e['successes']}/{e['episodes']}" if e else "" for e in found]
    by_task = plots_dir / "success_by_task.png"
    interval_chart(by_task, groups, series, labels=labels, ylabel="success rate (95% Wilson interval)",
                   title=f"success per task and arm ({results['eval_episodes']} episodes per task)")
    curves = {arm: results["arms"][arm].get("success_vs_round", []) for arm in FEDERATED if arm in results["arms"]}
    rounds = sorted({point["round"] for points in curves.values() for point in points})
    at = {arm: {p["round"]: p for p in points} for arm, points in curves.items()}
    by_round = plots_dir / "success_vs_round.png"
    # intervals per round rather than a bare line: mid-run points are judged on fewer episodes than the last
    interval_chart(by_round, [f"round {r}" for r in rounds],
                   {arm: [(p["success_rate"], *p["interval_95"]) if (p := at[arm].get(r)) else (None, 0.0, 0.0)
                          for r in rounds] for arm in curves},
                   labels={arm: [f"{p['successes']}/{p['episodes']}" if (p := at[arm].get(r)) else "" for r in rounds]
                           for arm in curves},
                   ylabel="success rate (95% Wilson interval)",
                   title="federated arms: success on the hosts' tasks by round (round 0: the base)")
    return [by_task, by_round]
