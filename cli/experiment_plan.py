"""The fl-vs-central experiment's decisions, as pure functions: hosts and their task mixes, scene seeds, step
budgets, the arms and what each is judged on, and when federated arms are judged along the way.

Seeds (one scene per seed, see zk0.hw.sim.tasks): host h records its episodes with scene seeds
`HOST_SEED_BASE + h * HOST_SEED_STRIDE + i`, i counting its episodes over its tasks in order (`session_seed`),
below `VALIDATION_SEED_BASE` as `zk0 record` insists; success is judged on
`VALIDATION_SEED_BASE + i` (zk0.agent.validate), which no host recorded. The ranges start at 500 000 so they
stay clear of the seeds 0.. that `zk0 record` uses by default (and that a base policy's own demonstrations use).

Equal budgets: every fine-tuned arm sees the same union of host data and takes the same number of optimizer
steps in total. A federated round trains `local_steps` on each of the H hosts, so R rounds are R x H x
local_steps steps; centralized training takes that many on the union; each local-only host takes R x
local_steps (what it trains in the federation), so the three local arms together take the same total.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

HOST_SEED_BASE = 500_000
HOST_SEED_STRIDE = 10_000
VALIDATION_SEED_BASE = 1_000_000  # zk0.agent.validate.VALIDATION_SEED_BASE (kept import-free here; a test checks)

# The arms every run has; local-only arms are named LOCAL_PREFIX + host name.
BASE, CENTRAL, FEDAVG, FEDPROX, LOCAL = "base", "central", "fedavg", "fedprox", "local"
LOCAL_PREFIX = "local-"
FEDERATED = (FEDAVG, FEDPROX)


@dataclass(frozen=True)
class HostPlan:
    """One simulated host: the tasks it records (equal shares of its episodes) and its first scene seed."""

    name: str
    tasks: tuple[str, ...]
    first_seed: int

    def episodes_per_task(self, episodes: int) -> dict[str, int]:
        """How a host's `episodes` split over its tasks: as evenly as possible, the first tasks taking the rest."""
        share, rest = divmod(episodes, len(self.tasks))
        return {task: share + (i < rest) for i, task in enumerate(self.tasks)}


@dataclass(frozen=True)
class ArmPlan:
    """One arm: how it is trained (`kind`: base, central, fedavg, fedprox, local) and the tasks it is judged on."""

    name: str
    kind: str
    tasks: tuple[str, ...]
    host: str = ""  # a local-only arm's host


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything a run depends on besides the base policy; `full()` and `quick()` are the two presets."""

    hosts: tuple[HostPlan, ...]
    unseen_tasks: tuple[str, ...]  # recorded by no host: does fine-tuning keep what the base knew?
    episodes_per_host: int
    episode_time_s: float  # recording: every scripted demonstration is done by then (measured <= 10.2 s)
    rounds: int
    local_steps: int
    batch_size: int
    eval_episodes: int  # per task and arm, on validation seeds
    progress_episodes: int  # per host task, for the success-vs-round curve of federated arms
    progress_points: int  # rounds judged along the way (besides round 0, the base, and the last)
    max_episode_s: float  # a judged episode not done by then is a failure
    camera_size: tuple[int, int] = (128, 96)  # width, height of the recorded (and judged) cameras
    fps: int = 30
    fedavg_lr: float = 1e-4  # FedAvg's constant LR (the experiment sets it to the base's fine-tuning LR)
    seed: int = 0

    @property
    def host_tasks(self) -> tuple[str, ...]:
        """Every task some host records, in host order, without repeats."""
        return tuple(dict.fromkeys(task for host in self.hosts for task in host.tasks))

    @property
    def tasks(self) -> tuple[str, ...]:
        return (*self.host_tasks, *self.unseen_tasks)

    @property
    def total_steps(self) -> int:
        """Optimizer steps every fine-tuned arm takes in all (see the module docstring)."""
        return self.rounds * len(self.hosts) * self.local_steps

    @property
    def local_steps_per_host(self) -> int:
        return self.rounds * self.local_steps


def default_hosts(pick: str = "pick_place_red", push: str = "push_blue_left") -> tuple[HostPlan, ...]:
    """Non-IID: one host only picks, one only pushes, one does both."""
    tasks = ((pick,), (push,), (pick, push))
    names = ("picker", "pusher", "mixed")
    return tuple(HostPlan(name, t, HOST_SEED_BASE + i * HOST_SEED_STRIDE) for i, (name, t) in enumerate(zip(names, tasks)))


def full() -> ExperimentConfig:
    """The benchmark (<= 90 min on the 2-core development machine). 10 rounds of 100 local steps rather than 20 of
    50: the same 3000 steps, and a round long enough that its fixed cost (relaying, encoding, the policy store's
    write, ~0.5 s with the simulation runtime) stays under 10 % of it."""
    return ExperimentConfig(hosts=default_hosts(), unseen_tasks=("push_green_right",), episodes_per_host=24,
                            episode_time_s=12.0, rounds=10, local_steps=100, batch_size=8, eval_episodes=50,
                            progress_episodes=10, progress_points=3, max_episode_s=12.0)


def quick() -> ExperimentConfig:
    """A smoke run of every step (<= 10 min): few episodes, rounds and judged episodes."""
    return replace(full(), episodes_per_host=4, rounds=3, local_steps=25, eval_episodes=3, progress_episodes=2,
                   progress_points=1)


def check(config: ExperimentConfig) -> None:
    """ValueError (one line) for a plan that would break the experiment's promises."""
    from zk0.hw.sim.tasks import TASKS

    names = [h.name for h in config.hosts]
    problems = [
        (len(config.hosts) >= 3, "at least 3 hosts"),
        (len(set(names)) == len(names), "host names must differ"),
        (all(t in TASKS for t in config.tasks), f"unknown task in {config.tasks}"),
        (not set(config.unseen_tasks) & set(config.host_tasks), "an unseen task is recorded by a host"),
        (len(config.unseen_tasks) >= 1, "at least one task no host records"),
        (all(config.episodes_per_host >= len(h.tasks) for h in config.hosts), "fewer episodes than tasks on a host"),
        (config.rounds >= 1 and config.local_steps >= 1 and config.batch_size >= 1, "rounds, steps, batch >= 1"),
        (config.eval_episodes >= 1 and config.progress_episodes >= 0, "judged episodes >= 1"),
    ]
    for ok, message in problems:
        if not ok:
            raise ValueError(f"experiment plan: {message}")
    ranges = sorted(seed_range(h, config.episodes_per_host) for h in config.hosts)
    for (_, end), (start, _) in zip(ranges, ranges[1:]):
        if start < end:
            raise ValueError("experiment plan: two hosts' recording seeds overlap")
    if ranges[0][0] < 0 or ranges[-1][1] > VALIDATION_SEED_BASE:
        raise ValueError(f"experiment plan: recording seeds must stay in [0, {VALIDATION_SEED_BASE})")


def seed_range(host: HostPlan, episodes: int) -> tuple[int, int]:
    """[first, end) of the scene seeds `host` records with."""
    return host.first_seed, host.first_seed + episodes


def session_seed(host: HostPlan, task: str, episodes: int) -> int:
    """First scene seed of `host`'s recording session of `task`: its tasks' sessions follow one another in the
    host's seed range, in the host's task order (`zk0 record --seed` numbers a dataset's episodes from it)."""
    shares = host.episodes_per_task(episodes)
    return host.first_seed + sum(shares[t] for t in host.tasks[:host.tasks.index(task)])


def arms(config: ExperimentConfig) -> list[ArmPlan]:
    """Every arm, judged on every task: the hosts' tasks (local-only arms: their own and the others') and the
    unseen ones (retention)."""
    everything = config.tasks
    plans = [ArmPlan(BASE, BASE, everything), ArmPlan(CENTRAL, CENTRAL, everything),
             ArmPlan(FEDAVG, FEDAVG, everything), ArmPlan(FEDPROX, FEDPROX, everything)]
    plans += [ArmPlan(LOCAL_PREFIX + h.name, LOCAL, everything, h.name) for h in config.hosts]
    return plans


def progress_rounds(rounds: int, points: int) -> list[int]:
    """Rounds strictly between 0 and `rounds` at which a federated arm's success is judged, evenly spread."""
    if points <= 0 or rounds <= 1:
        return []
    picked = {round(rounds * (i + 1) / (points + 1)) for i in range(points)}
    return sorted(r for r in picked if 0 < r < rounds)


def fedavg_scheduler(lr: float) -> dict[str, float]:
    """The server's `scheduler` section that makes it plain FedAvg: mu 0 throughout and a constant LR (cosine
    from lr down to eta_min = lr, no plateau boost, no spike damping)."""
    return {"base_lr": lr, "max_lr": lr, "eta_min": lr, "plateau_boost": 1.0, "spike_damping": 1.0,
            "base_mu": 0.0, "mu_min": 0.0, "unstable_client_mu": 0.0}


def server_settings(kind: str, config: ExperimentConfig, model: str, eval_datasets: Sequence[str],
                    run_dir: str) -> dict:
    """The server YAML (zk0.server.config) of a federated arm: the plan's rounds and steps from `model`, every
    host needed each round, the hosts' held-out splits as the server's evaluation data; FedProx keeps the
    shipped scheduler, FedAvg gets `fedavg_scheduler`."""
    if kind not in FEDERATED:
        raise ValueError(f"not a federated arm: {kind!r}")
    settings: dict = {
        "run_dir": run_dir,
        "training": {"rounds": config.rounds, "local_steps": config.local_steps, "batch_size": config.batch_size,
                     "model": model, "seed": config.seed},
        "nodes": {"min_nodes": len(config.hosts)},
        "evaluation": {"datasets": list(eval_datasets), "max_samples": 32},
    }
    if kind == FEDAVG:
        settings["scheduler"] = fedavg_scheduler(config.fedavg_lr)
    return settings
