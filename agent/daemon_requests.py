"""What the agent's control API accepts, checked before anything acts on it, and the job command lines it makes.

Every request that starts or steers work (`record`, `rollout`, `validate`, `train`, `policy`) has a dataclass
whose `from_args` takes the request's JSON "args" and raises ValueError naming the first fault, so malformed
or hostile input never reaches the agent's state (the control server turns the error into a reply). A job is
the same `zk0` command an operator would type on a host without the agent (`zk0 record`, `zk0 rollout`, `zk0
validate`), run with the agent's effective config and a private control address the agent forwards to.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zk0.agent.control import refuse_unknown_arguments

MAX_EPISODES = 10_000
MAX_TEXT = 500
DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")  # one path component, never ".." or absolute
POLICY_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,199}$")  # a store version, active or previous


def _text(args: Mapping[str, Any], key: str, command: str, default: str | None = None) -> str:
    value = args.get(key, default)
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_TEXT or "\x00" in value:
        raise ValueError(f'{command}: "{key}" must be a non-empty string of at most {MAX_TEXT} characters')
    return value


def _matching(args: Mapping[str, Any], key: str, command: str, pattern: re.Pattern, what: str,
              default: str | None = None) -> str:
    value = args.get(key, default)
    if not isinstance(value, str) or not pattern.match(value) or value in (".", ".."):
        raise ValueError(f'{command}: "{key}" must be {what}')
    return value


def _count(args: Mapping[str, Any], key: str, command: str, default: int | None, low: int = 1,
           high: int = MAX_EPISODES) -> int | None:
    value = args.get(key, default)
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f'{command}: "{key}" must be a whole number in [{low}, {high}]')
    return value


def _seconds(args: Mapping[str, Any], key: str, command: str) -> float | None:
    value = args.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 3600:
        raise ValueError(f'{command}: "{key}" must be a number of seconds in (0, 3600]')
    return float(value)


def _flag(args: Mapping[str, Any], key: str, command: str) -> bool:
    value = args.get(key, False)
    if not isinstance(value, bool):
        raise ValueError(f'{command}: "{key}" must be true or false')
    return value


def _action(args: Mapping[str, Any], command: str, actions: Sequence[str]) -> str:
    value = args.get("action")
    if value not in actions:
        raise ValueError(f'{command}: "action" must be one of {", ".join(actions)}')
    return value


@dataclass(frozen=True)
class RecordStart:
    dataset: str
    task: str
    episodes: int = 1
    episode_time_s: float | None = None
    seed: int | None = None

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> RecordStart:
        refuse_unknown_arguments(args, "record", ("action", "dataset", "task", "episodes", "episode_time_s", "seed"))
        return cls(_matching(args, "dataset", "record", DATASET_NAME, "a dataset name (letters, digits, _.-)"),
                   _text(args, "task", "record"), _count(args, "episodes", "record", 1),
                   _seconds(args, "episode_time_s", "record"),
                   _count(args, "seed", "record", None, low=0, high=999_999))


@dataclass(frozen=True)
class RolloutStart:
    task: str
    policy: str = "active"
    episodes: int = 1
    episode_time_s: float | None = None
    dagger: bool = False
    record: str | None = None  # dataset the episodes are recorded into

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> RolloutStart:
        refuse_unknown_arguments(args, "rollout", ("action", "task", "policy", "episodes", "episode_time_s", "dagger", "record"))
        record = args.get("record")
        return cls(_text(args, "task", "rollout"),
                   _matching(args, "policy", "rollout", POLICY_REF, "a store version, active or previous", "active"),
                   _count(args, "episodes", "rollout", 1), _seconds(args, "episode_time_s", "rollout"),
                   _flag(args, "dagger", "rollout"),
                   None if record is None else _matching(args, "record", "rollout", DATASET_NAME, "a dataset name"))


@dataclass(frozen=True)
class ValidateStart:
    policy: str
    against: str = "active"
    episodes: int | None = None
    tasks: tuple[str, ...] = ()
    promote: bool = False

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> ValidateStart:
        refuse_unknown_arguments(args, "validate", ("policy", "against", "episodes", "tasks", "promote"))
        tasks = args.get("tasks", [])
        if not isinstance(tasks, list) or len(tasks) > 50:
            raise ValueError('validate: "tasks" must be a list of at most 50 task names or instructions')
        return cls(_matching(args, "policy", "validate", POLICY_REF, "a store version, active or previous"),
                   _matching(args, "against", "validate", POLICY_REF, "a store version, active or previous", "active"),
                   _count(args, "episodes", "validate", None),
                   tuple(_text({"task": t}, "task", "validate") for t in tasks), _flag(args, "promote", "validate"))


def record_action(args: Mapping[str, Any]) -> RecordStart | str:
    """`record`: {"action": "start", ...RecordStart} or one of the session commands, forwarded to the recorder."""
    action = _action(args, "record", ("start", "stop", "save", "discard", "rerecord"))
    if action == "start":
        return RecordStart.from_args(args)
    refuse_unknown_arguments(args, "record", ("action",))
    return action


def rollout_action(args: Mapping[str, Any]) -> RolloutStart | str:
    action = _action(args, "rollout", ("start", "stop"))
    if action == "start":
        return RolloutStart.from_args(args)
    refuse_unknown_arguments(args, "rollout", ("action",))
    return action


def train_action(args: Mapping[str, Any]) -> str:
    """`train`: now (lease even outside the training hours, once), pause (refuse leases, revoke the one held), resume."""
    refuse_unknown_arguments(args, "train", ("action",))
    return _action(args, "train", ("now", "pause", "resume"))


@dataclass(frozen=True)
class PolicyAction:
    action: str
    version: str | None = None
    reason: str = "zk0ctl"

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> PolicyAction:
        refuse_unknown_arguments(args, "policy", ("action", "version", "reason"))
        action = _action(args, "policy", ("list", "promote", "rollback"))
        version = None
        if action == "promote":
            version = _matching(args, "version", "policy", POLICY_REF, "a store version")
        return cls(action, version, _text(args, "reason", "policy", "zk0ctl"))


@dataclass(frozen=True)
class JobPaths:
    """What every job command shares: the agent's effective config, where datasets and policies live, the
    control address the agent forwards operator commands to, and with --sim the description of the rig the agent
    keeps running for its jobs (zk0.hw.sim.rig_handle.RigHandle.attach)."""

    config: Path
    datasets_root: Path
    policy_store: Path
    control: str
    sim: bool
    reports: Path = field(default=Path("reports"))
    sim_rig: Path | None = None


def _rig_flags(paths: JobPaths) -> list[str]:
    """The flags of a job that drives the arm: the simulated rig with --sim, the agent's own rig when it keeps one."""
    if not paths.sim:
        return []
    return ["--sim"] + (["--sim-rig", str(paths.sim_rig)] if paths.sim_rig is not None else [])


def record_argv(request: RecordStart, paths: JobPaths) -> list[str]:
    argv = ["record", "--config", str(paths.config), "--root", str(paths.datasets_root), "--dataset", request.dataset,
            "--task", request.task, "--episodes", str(request.episodes), "--control", paths.control, "--no-progress"]
    argv += ["--episode-time-s", str(request.episode_time_s)] if request.episode_time_s else []
    argv += ["--seed", str(request.seed)] if request.seed is not None else []
    return argv + _rig_flags(paths)


def rollout_argv(request: RolloutStart, paths: JobPaths) -> list[str]:
    argv = ["rollout", "--config", str(paths.config), "--store", str(paths.policy_store), "--policy", request.policy,
            "--task", request.task, "--episodes", str(request.episodes), "--control", paths.control]
    argv += ["--episode-time-s", str(request.episode_time_s)] if request.episode_time_s else []
    argv += ["--dagger"] if request.dagger else []
    argv += ["--record", request.record, "--root", str(paths.datasets_root)] if request.record else []
    return argv + _rig_flags(paths)


def validate_argv(request: ValidateStart, paths: JobPaths, report_dir: Path) -> list[str]:
    argv = ["validate", "--config", str(paths.config), "--store", str(paths.policy_store), "--policy", request.policy,
            "--against", request.against, "--report", str(report_dir), "--control", paths.control]
    argv += ["--episodes", str(request.episodes)] if request.episodes else []
    for task in request.tasks:
        argv += ["--task", task]
    argv += ["--promote"] if request.promote else []
    return argv + (["--sim"] if paths.sim else [])
