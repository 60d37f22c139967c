"""`zk0 validate`: a candidate policy against another (the active one by default) on paired, seeded episodes.

With --sim both policies run the same (task, seed) episodes in the lock-step simulation (zk0.agent.lockstep),
inside the safety envelope the config describes. Without it they run on the config's robot and the operator
gives each episode's verdict (zk0.agent.validate_robot). The verdict is zk0.agent.validate's promotion rule,
written with every episode's outcome to `--report DIR` (report.json, report.png). `--promote` applies a
positive verdict through the policy store, naming the report as the reason.

Exit status: 0 the candidate may be promoted (and was, with --promote), 1 it may not, 2 the command could
not run (bad arguments, unknown task, unloadable policy), 3 stopped early (estop, watchdog, hardware; the
pairs done so far are in the report).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import socket
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROBOT_CONFIG = Path("/etc/zk0/agent.yaml")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", required=True, metavar="REF",
                        help="candidate: a store version, 'active', 'previous', or a lerobot checkpoint directory")
    parser.add_argument("--against", default="active", metavar="REF", help="the policy to beat (default %(default)s)")
    parser.add_argument("--episodes", type=int, help="paired episodes (default: the config's validation.episodes)")
    parser.add_argument("--sim", action="store_true",
                        help="run the episodes in the lock-step simulation (default: on the robot, operator verdicts)")
    parser.add_argument("--task", action="append", default=[], metavar="T",
                        help="simulated task name or instruction (repeatable; default: the config's validation.tasks, "
                             "else the tasks of the config's federation datasets)")
    parser.add_argument("--report", required=True, type=Path, metavar="DIR", help="where report.json and report.png go")
    parser.add_argument("--promote", action="store_true", help="make the candidate active if the verdict allows it")
    parser.add_argument("--store", type=Path, metavar="DIR", help="policy store (default: the config's)")
    parser.add_argument("--config", type=Path, metavar="F",
                        help=f"agent config: validation, safety and fps settings; the robot (default {ROBOT_CONFIG} "
                             "without --sim)")
    parser.add_argument("--device", default="cpu", help="torch device the policies run on (default %(default)s)")
    parser.add_argument("--backend", choices=("torch", "onnxruntime"),
                        help="what computes the actions (default: the config's rollout.backend, else torch)")
    parser.add_argument("--control", metavar="ADDRESS", help="without --sim: control API address for zk0ctl "
                                                              "(default from config)")
    parser.add_argument("--write-calibration", action="store_true",
                        help="without --sim: write the calibration file into the motors when they disagree")


def run(args: argparse.Namespace) -> int:
    from zk0.agent.config import ConfigError
    from zk0.agent.lockstep import policy_in_sim
    from zk0.agent.ownership import RobotOwned, refuse_if_agent_owns_robot
    from zk0.agent.policy_store import PolicyStoreError
    from zk0.hw.robots import CalibrationError

    if not args.sim and args.config is None:
        args.config = ROBOT_CONFIG
    try:
        if not args.sim:
            refuse_if_agent_owns_robot("validate")
        setup = _setup(args)
        policies = {role: _load(ref, setup.store, args.device, setup.rollout) for role, ref in
                    (("candidate", args.policy), ("active", args.against))}
        if args.promote:
            _check_promotable(policies, setup.store)
        runners = {role: policy_in_sim(p.bundle, setup.fps, setup.robot, args.device)
                   for role, p in policies.items()} if args.sim else None
        started = time.monotonic()
        outcomes, stopped = (sim_outcomes(setup, runners), None) if args.sim else _robot_outcomes(args, setup, policies)
    except (ConfigError, PolicyStoreError, ValueError, FileNotFoundError, CalibrationError, RobotOwned) as error:
        print(f"zk0 validate: {error}", file=sys.stderr)
        return 2
    except (ConnectionError, TimeoutError) as error:
        print(f"zk0 validate: hardware error, stopped: {error}", file=sys.stderr)
        return 3
    return _conclude(args, setup, policies, outcomes, stopped, started)


def _robot_outcomes(args: argparse.Namespace, setup: Setup, policies: dict[str, LoadedPolicy]):
    from zk0.agent.config import load_config
    from zk0.agent.validate_robot import robot_outcomes

    config = load_config(args.config, check_devices=True)
    print(f"zk0 validate: {len(policies)} policies on {setup.episodes} paired episodes on the robot; the console does "
          "not say which policy runs", flush=True)
    return robot_outcomes(config, setup, policies, args.control, args.write_calibration, args.device)


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything the episodes depend on besides the policies, all recorded in the report."""

    robot: str
    fps: int
    episodes: int
    tasks: list[str]
    margin: float
    max_episode_s: float
    safety: Any  # zk0.hw.config.SafetySettings
    store: Path | None
    config_path: str | None
    host: str  # the config's host_id, else the machine's name
    simulated: bool
    rollout: Any = None  # zk0.agent.config.RolloutSettings (the inference backend); None: the defaults

    def settings(self) -> dict[str, Any]:
        """The report's record of how the episodes ran."""
        return {"robot": self.robot, "fps": self.fps, "max_episode_s": self.max_episode_s,
                "safety": dataclasses.asdict(self.safety), "config": self.config_path,
                "simulation": "lock-step" if self.simulated else None,
                "backend": self.rollout.backend if self.rollout else "torch",
                "verdicts": "success predicate" if self.simulated else "operator (zk0ctl verdict)",
                "promotion_margin": self.margin}


def _setup(args: argparse.Namespace) -> Setup:
    from zk0.agent.config import AgentConfig, ConfigError, RolloutSettings, ValidationSettings, load_config
    from zk0.hw.config import SafetySettings

    config: AgentConfig | None = load_config(args.config, check_devices=False) if args.config else None
    validation = config.validation if config else ValidationSettings()
    episodes = validation.episodes if args.episodes is None else args.episodes
    if episodes <= 0:
        raise ConfigError("--episodes must be positive")
    federation = config.federation if config else None
    store = args.store or (federation.policy_store if federation else None)
    if args.promote and store is None:
        raise ConfigError("--promote needs a policy store: --store or the config's federation.policy_store")
    names = args.task or validation.tasks or (_dataset_tasks(config) if config else [])
    if not names:
        raise ConfigError("no tasks to validate on: name them with --task or the config's validation.tasks")
    return Setup(
        robot=config.robot_type if config else "so101", fps=config.record.fps if config else 30, episodes=episodes,
        tasks=sim_tasks(names) if args.sim else list(dict.fromkeys(names)), margin=validation.promotion_margin,
        max_episode_s=validation.max_episode_s,
        safety=config.safety if config else SafetySettings(), store=store,
        config_path=str(args.config.resolve()) if args.config else None,
        host=config.host_id if config else socket.gethostname(), simulated=args.sim,
        rollout=_inference_settings(config.rollout if config else RolloutSettings(), args.backend),
    )


def _inference_settings(settings: Any, backend: str | None) -> Any:
    """The config's rollout settings with `--backend` over its backend; validation always runs sync."""
    from zk0.agent.config import ConfigError

    try:
        return dataclasses.replace(settings, inference="sync", backend=backend or settings.backend)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def sim_tasks(names: Sequence[str]) -> list[str]:
    """Simulated task names for task names or instructions, in order, without repeats; one unknown refuses."""
    from zk0.agent.record_cli import sim_task_name

    tasks: list[str] = []
    for name in names:
        task = sim_task_name(name)
        if task is None:
            raise ValueError(f"task {name!r} matches no simulated task")
        if task not in tasks:
            tasks.append(task)
    return tasks


def _dataset_tasks(config: Any) -> list[str]:
    """The tasks recorded in the datasets this host trains on (zk0.json of each federation dataset)."""
    from zk0.agent.dataset_commit import read_commit
    from zk0.agent.node import node_settings

    if config.federation is None:
        return []
    tasks: list[str] = []
    for root in node_settings(config).datasets:
        record = read_commit(root)
        tasks += [] if record is None else record.tasks
    return tasks


@dataclasses.dataclass
class LoadedPolicy:
    ref: str
    version: str | None  # the store version `ref` named; None for a checkpoint directory
    path: Path
    bundle: Any  # zk0.learn.policy.PolicyBundle
    meta: Any  # zk0.learn.checkpoint.CheckpointMeta

    def label(self) -> str:
        """How a rollout names these weights: checkpoint folder @ SHA-256 prefix."""
        return f"{self.path.name}@{self.meta.sha256[:12]}"

    def describe(self) -> dict[str, Any]:
        """What the report records: which weights these were (SHA-256 of model.safetensors, and for a store
        version the SHA-256 of its trainable tensors and base in `extra`) and where they came from."""
        return {"ref": self.ref, "version": self.version, "path": str(self.path), "sha256": self.meta.sha256,
                "run": self.meta.run, "round": self.meta.round, "parent": self.meta.parent, "extra": self.meta.extra}


def _load(ref: str, store: Path | None, device: str, rollout: Any) -> LoadedPolicy:
    from zk0.agent.config import RolloutSettings
    from zk0.agent.policy_store import PolicyStore, resolve_policy
    from zk0.agent.rollout_engines import load_policy

    # Resolved to a version name once: a promotion meanwhile must not make "active" name other weights.
    version = None if Path(ref).is_dir() or store is None else PolicyStore(store).get(ref).name
    path = Path(resolve_policy(version or ref, store)).absolute()  # the store's cache name, not the version folder
    bundle, meta = load_policy(path, device, rollout or RolloutSettings())
    return LoadedPolicy(ref, version, path, bundle, meta)


def _check_promotable(policies: dict[str, LoadedPolicy], store: Path) -> None:
    """A promotion replaces the active version, so the candidate must be a store version and the baseline
    must be the version that is active right now (checked again just before promoting)."""
    from zk0.agent.policy_store import PolicyStore

    if policies["candidate"].version is None:
        raise ValueError(f"--promote needs a store version as --policy, not the directory {policies['candidate'].ref}")
    active = PolicyStore(store).state().active
    if policies["active"].version != active:
        raise ValueError(f"--promote needs --against to be the active version ({active}), "
                         f"not {policies['active'].ref}")


def sim_outcomes(setup: Setup, runners: dict[str, tuple[Any, Any]]) -> dict[str, list]:
    """Run the paired episodes in lock-step (progress: one line per pair)."""
    from zk0.agent.lockstep import run_episode
    from zk0.agent.validate import episode_plan
    from zk0.hw.safety import SafetyEnvelope, envelope_spec
    from zk0.hw.sim.lockstep import follower_limits

    spec = envelope_spec(follower_limits(), setup.safety, setup.fps, setup.robot)
    plan = episode_plan(setup.tasks, setup.episodes)
    max_ticks = int(round(setup.max_episode_s * setup.fps))
    outcomes: dict[str, list] = {role: [] for role in runners}
    for index, (task, seed) in enumerate(plan):
        pair_started = time.monotonic()
        for role, (sim, controller) in runners.items():
            outcomes[role].append(run_episode(sim, controller, SafetyEnvelope(spec), task, seed, max_ticks))
        print(f"pair {index + 1}/{len(plan)} {task} seed {seed}: "
              + " | ".join(f"{role} {_brief(runs[-1], setup.fps)}" for role, runs in outcomes.items())
              + f" [{time.monotonic() - pair_started:.1f} s]", flush=True)
    return outcomes


def _conclude(args: argparse.Namespace, setup: Setup, policies: dict[str, LoadedPolicy], outcomes: dict[str, list],
              stopped: str | None, started: float) -> int:
    """Write the report of the pairs that ran and apply --promote; a session stopped early never promotes."""
    from zk0.agent.validate import build_report, write_report

    report = build_report(policies={role: p.describe() for role, p in policies.items()}, outcomes=outcomes,
                          tasks=setup.tasks, margin=setup.margin, settings=setup.settings(),
                          elapsed_s=time.monotonic() - started)
    report["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    report["host"] = setup.host
    verdict = report["verdict"]
    if stopped is not None:
        verdict.update(promote=False, reason=f"stopped ({stopped}) after {len(outcomes['candidate'])} of "
                                             f"{setup.episodes} pairs; not promoted")
    json_path, _ = write_report(args.report, report)
    if args.promote and verdict["promote"]:
        from zk0.agent.policy_store import PolicyStore, PolicyStoreError

        try:
            _check_promotable(policies, setup.store)  # someone may have promoted another version meanwhile
            PolicyStore(setup.store).promote(policies["candidate"].version, reason=str(json_path.resolve()))
        except (PolicyStoreError, ValueError) as error:
            print(f"zk0 validate: not promoted: {error}\nreport: {json_path}", file=sys.stderr)
            return 2
        verdict["promoted"] = True
        write_report(args.report, report)
    action = "promoted" if verdict["promoted"] else ("may be promoted" if verdict["promote"] else "not promoted")
    print(f"verdict: {args.policy} {action}: {verdict['reason']}\nreport: {json_path}")
    if stopped is not None:
        return 3
    return 0 if verdict["promote"] else 1


def _brief(outcome: Any, fps: int) -> str:
    verdict = f"success in {outcome.time_to_success_s:.1f} s" if outcome.success else f"fail after {outcome.ticks / fps:.1f} s"
    return verdict + (f" ({outcome.intervened_ticks} ticks clamped)" if outcome.intervened_ticks else "")
