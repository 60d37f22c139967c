"""`zk0 experiment fl-vs-central --out DIR [--quick]`: does federating help? Measured as success on the robot.

A fleet of simulated hosts with non-IID task mixes (zk0.cli.experiment_plan: one only picks, one only pushes,
one does both; a task no host records) records its own demonstrations (`zk0 record --sim`). From one base
policy, with the same data and the same total optimizer steps, five arms are trained:

- base: no fine-tuning;
- central: `zk0 train` on the union of the hosts' data;
- fedavg: zk0's ServerApp and ClientApp with mu = 0 and a constant LR;
- fedprox: the same with the shipped LR / mu schedule (server/schedule.py defaults);
- local-<host>: `zk0 train` on that host's data alone.

Each is judged like `zk0 validate --sim` (zk0.cli.experiment_eval) on every task, on validation seeds no host
recorded; federated arms also at a few rounds along the way. Written to DIR: results.json, results.md, plots/
(success per task and arm; success vs round), and what produced them: data/ (the hosts' datasets, reused by a
rerun into the same DIR), base/, arms/<arm>/ (checkpoints, `zk0 train` outputs, federated run directories),
logs/.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from zk0.cli.experiment_federation import RUNTIMES
from zk0.cli.experiment_plan import BASE, CENTRAL, FEDERATED, LOCAL
from zk0.cli.experiment_training import PRESETS, default_base

RUNTIME_WHY = {
    "simulation": "Flower's simulation runtime keeps ClientApp actors alive and pulls replies every 0.1 s; each "
                  "host's policy and data stay built in its learning worker",
    "deployment": "Flower's deployment engine (SuperLink + SuperNodes on loopback, as `zk0 fleet local "
                  "--learn-workers`); its polling costs seconds per message",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="experiment", required=True)
    fl = sub.add_parser("fl-vs-central", help="success of base, centralized, FedAvg, FedProx and local-only policies "
                                              "on a simulated non-IID fleet",
                        description=__doc__.splitlines()[0])
    fl.add_argument("--out", type=Path, required=True, help="output directory (results.json, results.md, plots/)")
    fl.add_argument("--quick", action="store_true", help="a smoke run of every step (minutes, not an hour)")
    fl.add_argument("--base", metavar="BASE",
                    help=f"the policy every arm starts from: {' | '.join(PRESETS)} | a checkpoint directory "
                         f"(default {default_base(quick=False)}; with --quick {default_base(quick=True)})")
    fl.add_argument("--runtime", choices=RUNTIMES, default="simulation",
                    help="Flower runtime of the federated arms (default %(default)s)")


class Progress:
    """Progress lines on stdout, stamped with the time since the experiment started."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def __call__(self, message: str) -> None:
        minutes, seconds = divmod(int(self.elapsed), 60)
        print(f"[{minutes:02d}:{seconds:02d}] {message}", flush=True)


def run(args: argparse.Namespace) -> int:
    from zk0.cli.experiment_plan import check, full, quick

    # one torch thread per process: the machine has two cores and the learning workers train side by side
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.runtime == "simulation" and importlib.util.find_spec("ray") is None:
        print("zk0 experiment: the simulation runtime needs Flower's simulation extra: "
              "pip install -e '.[experiment]' (or --runtime deployment)")
        return 2
    config = quick() if args.quick else full()
    check(config)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    say = Progress()
    try:
        results = experiment(config, args.base or default_base(args.quick), args.runtime, out, say,
                             quick_run=args.quick)
    except (RuntimeError, FileNotFoundError, ValueError) as error:
        say(f"zk0 experiment: {error}")
        return 1
    say(f"done: {out / 'results.md'}")
    return 0


def experiment(config, base_name: str, runtime: str, out: Path, say: Progress, quick_run: bool) -> dict[str, Any]:
    """Record, train every arm, judge them and write the results; returns results.json's content."""
    import torch

    from zk0.cli import experiment_results as report
    from zk0.cli.experiment_data import demonstration_summary, record_hosts
    from zk0.cli.experiment_eval import judge
    from zk0.cli.experiment_plan import arms, progress_rounds
    from zk0.cli.experiment_training import fine_tuning_lr, prepare_base

    torch.set_num_threads(1)
    logs = out / "logs"
    say(f"recording {config.episodes_per_host} scripted episodes on each of {len(config.hosts)} hosts: "
        + "; ".join(f"{h.name} {', '.join(h.tasks)}" for h in config.hosts))
    datasets = record_hosts(config, out / "data", logs)
    hosts = {h.name: {"tasks": list(h.tasks), **demonstration_summary(datasets[h.name])} for h in config.hosts}
    say("recorded: " + ", ".join(f"{n} {h['successes']}/{h['episodes']} successful" for n, h in hosts.items()))
    union = [root for roots in datasets.values() for root in roots]
    base = prepare_base(base_name, out, union, config.seed, lambda line: say(f"building the sim base: {line}"))
    config = replace(config, fedavg_lr=fine_tuning_lr(base))
    say(f"base {base_name}: {base} (fine-tuning LR {config.fedavg_lr:g})")

    plans = arms(config)
    for plan in plans:
        shutil.rmtree(out / "arms" / plan.name, ignore_errors=True)  # every arm trains afresh; recordings are reused
    entries: dict[str, dict[str, Any]] = {
        BASE: {"kind": BASE, "steps": 0, "wall_s": 0.0, "bytes_moved": 0, "checkpoint": str(base)}}
    # `zk0 train` arms two at a time (each is one process with one torch thread), the federations one at a time
    trained = [p for p in plans if p.kind in (CENTRAL, LOCAL)]
    say(f"training {', '.join(p.name for p in trained)} (`zk0 train`, two at a time)")
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {p.name: pool.submit(train, p, base, union if p.kind == CENTRAL else datasets[p.host], config,
                                       out / "arms" / p.name, logs) for p in trained}
        for name, future in futures.items():
            entries[name] = future.result()
            # centralizing moves the hosts' raw data; a local arm moves nothing
            entries[name]["bytes_moved"] = sum(h["bytes"] for h in hosts.values()) if name == CENTRAL else 0
            say(f"{name}: {entries[name]['steps']} steps, {entries[name]['train_s']:.0f} s of training, "
                f"{entries[name]['wall_s']:.0f} s in all")
    for plan in (p for p in plans if p.kind in FEDERATED):
        say(f"training {plan.name} ({runtime} runtime, {config.rounds} rounds x {len(config.hosts)} hosts x "
            f"{config.local_steps} steps)")
        entries[plan.name] = federate(plan.kind, base, datasets, config, runtime, out / "arms" / plan.name, say)
        say(f"{plan.name}: {entries[plan.name]['steps']} steps in {entries[plan.name]['wall_s']:.0f} s")
    entries = {p.name: entries[p.name] for p in plans}
    # what training cost, kept before the long judging starts (results.json replaces it at the end)
    (out / "training.json").write_text(json.dumps({"config": asdict(config), "hosts": hosts, "arms": entries},
                                                  indent=2, default=str))

    say(f"judging {len(entries)} policies on {config.eval_episodes} episodes of each of {len(config.tasks)} tasks")
    judged = judge({name: Path(e["checkpoint"]) for name, e in entries.items()}, config.tasks, config.eval_episodes,
                   config.fps, config.max_episode_s)
    for name, entry in entries.items():
        entry["success"] = report.success_entry(judged[name], name, config)

    along = {f"{arm}@{r}": Path(entries[arm]["run_dir"]) / "checkpoints" / f"round_{r}"
             for arm in FEDERATED for r in progress_rounds(config.rounds, config.progress_points)}
    if along and config.progress_episodes:
        say(f"judging federated arms along the way: {', '.join(along)}")
        midway = judge(along, config.host_tasks, config.progress_episodes, config.fps, config.max_episode_s)
    else:
        midway = {}
    for arm in FEDERATED:
        judged_midway = {int(key.split("@")[1]): v for key, v in midway.items() if key.startswith(f"{arm}@")}
        entries[arm]["success_vs_round"] = report.success_curve(entries[BASE]["success"], judged_midway,
                                                                entries[arm]["success"], config)

    results: dict[str, Any] = {
        "format": "zk0-experiment/1", "experiment": "fl-vs-central", "quick": quick_run,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": asdict(config), "base": {"name": base_name, "checkpoint": str(base)},
        "tasks": list(config.tasks), "host_tasks": list(config.host_tasks), "unseen_tasks": list(config.unseen_tasks),
        "eval_episodes": config.eval_episodes, "hosts": hosts,
        "seeds": {"hosts": {n: h["seeds"] for n, h in hosts.items()},
                  "validation": "1000000 + i (zk0 validate's episode plan: tasks in turn)"},
        "runtime": {"name": runtime, "why": RUNTIME_WHY[runtime]},
        "arms": entries, "load_average": [round(v, 2) for v in os.getloadavg()],
    }
    results["criteria"] = report.criteria(results)
    results["elapsed_s"] = round(say.elapsed, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    report.write_plots(results, out / "plots")
    (out / "results.md").write_text(report.markdown(results))
    return results


def train(plan, base: Path, roots: list[Path], config, arm_dir: Path, logs: Path) -> dict[str, Any]:
    """A centralized or local-only arm: `zk0 train` with the plan's budget for it."""
    from zk0.cli.experiment_training import train_arm

    steps = config.total_steps if plan.kind == CENTRAL else config.local_steps_per_host
    trained = train_arm(plan.name, base, roots, steps, config.batch_size, config.seed, arm_dir, logs)
    return {"kind": plan.kind, **trained, "checkpoint": str(trained["checkpoint"])}


def federate(kind: str, base: Path, datasets: dict[str, list[Path]], config, runtime: str, arm_dir: Path,
             say: Progress) -> dict[str, Any]:
    """One federated arm: its server config, the run, and what it cost (steps, wall, bytes, round overhead)."""
    import yaml

    from zk0.cli import experiment_results as report
    from zk0.cli.experiment_federation import FederatedHost, run_federation
    from zk0.cli.experiment_plan import server_settings
    from zk0.cli.fleet import RoundProgress
    from zk0.server.config import load_server_config

    run_dir = arm_dir / "run"
    server_yaml = arm_dir / "server.yaml"
    server_yaml.parent.mkdir(parents=True, exist_ok=True)
    eval_roots = [str(root) for roots in datasets.values() for root in roots]
    server_yaml.write_text(yaml.safe_dump(server_settings(kind, config, str(base), eval_roots, str(run_dir))))
    server_config = load_server_config(server_yaml)
    hosts = [FederatedHost(name, roots, arm_dir / "nodes" / name / "policies") for name, roots in datasets.items()]
    round_lines = RoundProgress(run_dir / "federated_metrics.json", config.rounds)
    wall = run_federation(runtime, server_config.run_config(server_yaml), hosts, arm_dir, lambda: round_lines())
    metrics = json.loads((run_dir / "federated_metrics.json").read_text())
    last = max(r["round"] for r in metrics["rounds"])
    if last != config.rounds:
        raise RuntimeError(f"{kind}: the federation stopped after round {last} of {config.rounds}; "
                           f"see {run_dir / 'server.log'}")
    figures = report.federated_figures(metrics)
    steps = sum(int(c["metrics"].get("steps", 0)) for r in metrics["rounds"] for c in r.get("clients", {}).values()
                if c.get("accepted"))
    overhead = report.round_overhead(metrics)
    mean = overhead["warm_mean"]
    if mean:
        say(f"{kind}: warm round {mean['wall_s']:.1f} s, node train {mean['node_train_s']:.1f} s, node eval "
            f"{mean['node_eval_s']:.2f} s, overhead {mean['overhead_fraction']:.1%} of the round")
    return {"kind": kind, "steps": steps, "wall_s": wall, "bytes_moved": figures["bytes_moved"], "federation": figures,
            "round_overhead": overhead, "run_dir": str(run_dir),
            "checkpoint": str(run_dir / "checkpoints" / f"round_{config.rounds}")}
