"""The experiment's hosts record their own demonstrations: `zk0 record --sim` (the simulated rig, the scripted
operator, lerobot's robot and the zk0 recorder, in real time), one LeRobot dataset per host and task.

A host's datasets are `<data>/<host>/<task>`; a host that does several tasks has several datasets (a zk0 node
trains on all of its datasets), so every session records side by side instead of one after another. Each
session's `--seed` is its own first scene seed (zk0.cli.experiment_plan.session_seed). Cameras are recorded at
the plan's small size: every policy resizes frames to its own input (64x64 for the tiny stand-in), and small
frames keep several real-time recorders on two cores close to their rate. A dataset that already holds what the
plan asks for is kept (a rerun into the same --out reuses its data).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from zk0.cli.experiment_plan import ExperimentConfig, HostPlan, session_seed
from zk0.hw.sim.tasks import get_task

REPO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "agent.yaml"


def agent_config(host: HostPlan, task: str, config: ExperimentConfig, path: Path) -> Path:
    """The shipped sim agent config with this host's id and the plan's camera size and rate."""
    raw: dict[str, Any] = yaml.safe_load(REPO_CONFIG.read_text())
    width, height = config.camera_size
    raw["host_id"] = host.name
    raw["cameras"] = [{**camera, "width": width, "height": height, "fps": config.fps} for camera in raw["cameras"]]
    raw["record"] = {**raw.get("record", {}), "fps": config.fps}
    # its own control socket: hosts record side by side, and other recorders on the machine use the default
    raw["control_address"] = f"ipc:///tmp/zk0-experiment-{os.getpid()}-{host.name}-{task}.sock"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def recorded(root: Path) -> int:
    """Committed episodes of a zk0 dataset (0 if there is none)."""
    from zk0.agent.dataset_commit import read_commit

    record = read_commit(root) if (root / "meta" / "info.json").is_file() else None
    return len(record.episodes) if record else 0


ATTEMPTS = 5  # a simulated bus on a loaded machine can miss its connect handshake (zk0.hw.robots retries 3x too)


def record_session(host: HostPlan, task: str, episodes: int, first_seed: int, config: ExperimentConfig,
                   data_root: Path, log_dir: Path, delay_s: float = 0.0) -> Path:
    """Record `episodes` of `task` on `host` into `<data_root>/<host>/<task>` (unless it holds them already),
    after `delay_s` (sessions start staggered: a rig's start is the busiest moment of a recording)."""
    root = data_root / host.name / task
    if recorded(root) == episodes:
        return root
    time.sleep(delay_s)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"record-{host.name}-{task}.log"
    agent_yaml = agent_config(host, task, config, log_dir / f"agent-{host.name}-{task}.yaml")
    # frames carry the task's instruction: what a policy is told when it is judged (zk0.agent.lockstep)
    command = [sys.executable, "-m", "zk0.cli", "record", "--sim", "--config", str(agent_yaml),
               "--root", str(root.parent), "--dataset", task, "--task", get_task(task).instruction,
               "--episodes", str(episodes), "--episode-time-s", str(config.episode_time_s), "--reset-time-s", "0",
               "--seed", str(first_seed), "--no-progress"]
    for _ in range(ATTEMPTS):
        shutil.rmtree(root, ignore_errors=True)  # partial, failed or from another plan: record it again, whole
        with open(log_path, "a") as log:
            result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if result.returncode == 0:
            return root
    raise RuntimeError(f"zk0 record for host {host.name} ({task}) exited {result.returncode} {ATTEMPTS} times; "
                       f"see {log_path}")


def record_hosts(config: ExperimentConfig, data_root: Path, log_dir: Path) -> dict[str, list[Path]]:
    """Every host's datasets, all sessions recorded side by side; host name -> its dataset roots."""
    sessions = [(host, task, n, session_seed(host, task, config.episodes_per_host))
                for host in config.hosts for task, n in host.episodes_per_task(config.episodes_per_host).items()]
    with ThreadPoolExecutor(max_workers=len(sessions)) as pool:
        futures = [(host.name, pool.submit(record_session, host, task, n, seed, config, data_root, log_dir, 5.0 * i))
                   for i, (host, task, n, seed) in enumerate(sessions)]
        roots: dict[str, list[Path]] = {}
        for name, future in futures:
            roots.setdefault(name, []).append(future.result())
    return roots


def dataset_bytes(root: Path) -> int:
    """Bytes on disk of a dataset: what centralizing it would move."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def demonstration_summary(roots: list[Path]) -> dict[str, Any]:
    """Episodes, scripted successes, scene seeds and bytes of a host's recorded datasets (from meta/zk0.json)."""
    from zk0.agent.dataset_commit import read_commit

    records = [read_commit(root) for root in roots]
    episodes = [e for record in records if record for e in record.episodes]
    seeds = sorted(e.seed for e in episodes if e.seed is not None)
    return {"episodes": len(episodes), "successes": sum(bool(e.success) for e in episodes),
            "seeds": [seeds[0], seeds[-1]] if seeds else None, "bytes": sum(dataset_bytes(r) for r in roots),
            "datasets": [str(r) for r in roots]}
