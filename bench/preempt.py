"""Preemption latency of the zk0 agent: from `zk0ctl record start` to training stopped and teleop running.

A real `zk0 agent --sim` grants a training lease to a holder in this process (zk0.agent.lease, the code a
node's ClientApp runs) that trains the tiny SmolVLA with zk0's local trainer on a recorded dataset until it must
stop; then, per trial, the agent is asked to record (`record start`, as `zk0ctl` sends it), and three
instants are taken:

- record answered: the agent's reply to `record start` (the job is started by then);
- lease lost: the holder's `should_stop()` turns true (the agent's revocation on its event stream);
- training stopped: the end of the training step that was running then (steps stop only at a boundary);
- teleop running: the recording job reports its first recorded frame (its own control API, `frames` > 0).
  Jobs are forked from the agent's pre-imported zygote (zk0.agent.job_zygote) and connect to the simulated rig
  the agent keeps for them (zk0.agent.daemon.SimRig): the trials start once both are ready.

Per trial the recording is stopped at once (`zk0ctl stop`: that episode is saved) and the next trial waits for
the agent to be idle and the lease to be granted again. Prints one JSON object: p50/p99 of each latency over
`--trials`. Target (issue #14): p99 <= 1 s for both training stopped and teleop running. Only meaningful on a
quiet machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TASK = "pick the red cube"


def ask(run: Path, command: str, args: dict | None = None, socket: str = "agent.sock") -> dict:
    from zk0.agent.control import request

    return request(f"ipc://{run / socket}", command, 10.0, args)


def wait(predicate, timeout_s: float, what: str, poll_s: float = 0.005) -> float:
    """Poll until `predicate()`; the perf_counter time it first held."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout_s:.0f} s")
        time.sleep(poll_s)
    return time.perf_counter()


def make_trainer(dataset: Path):
    """The tiny SmolVLA and its local trainer on `dataset`, as a node trains (zk0.learn.trainer)."""
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata

    from zk0.learn.data import EpisodeData, policy_image_size
    from zk0.learn.frame_cache import FrameCache
    from zk0.learn.policy import PolicySpec, seeded_policy_bundle
    from zk0.learn.trainer import LocalTrainer, TrainerConfig

    bundle = seeded_policy_bundle(PolicySpec(model="tiny"), LeRobotDatasetMetadata("local/bench", root=dataset), seed=0)
    data = EpisodeData(dataset, bundle.policy.config.chunk_size, policy_image_size(bundle.policy.config), FrameCache())
    return LocalTrainer(bundle.policy, bundle.preprocessor, data, TrainerConfig(batch_size=2))


def trial(run: Path, trainer, index: int) -> dict[str, float]:
    held = wait_for_lease(run)
    stopped: dict[str, float] = {}
    lost_seen: list[float] = []

    def should_stop() -> bool:
        if held.should_stop():
            lost_seen.append(time.perf_counter())
            return True
        return False

    def train() -> None:
        trainer.train(None, 10**9, should_stop=should_stop)
        stopped["at"] = time.perf_counter()

    teleop: dict[str, float] = {}
    with held:
        worker = threading.Thread(target=train)
        worker.start()
        time.sleep(1.0)  # well into training
        # watched beside the training, so a training step that ends late does not delay the teleop figure
        watcher = threading.Thread(target=_first_frame, args=(run, teleop))
        sent = time.perf_counter()
        ask(run, "record", {"action": "start", "dataset": "bench", "task": TASK, "episodes": 1, "episode_time_s": 30,
                            "seed": index})
        answered = time.perf_counter()
        watcher.start()
        worker.join()
    watcher.join()
    ask(run, "stop")
    wait(lambda: ask(run, "status")["state"] == "idle", 300, "the agent back to idle", poll_s=0.2)
    return {"record_answered_s": answered - sent, "lease_lost_s": lost_seen[0] - sent, "training_stopped_s": stopped["at"] - sent, "teleop_running_s": teleop["at"] - sent}


def _first_frame(run: Path, into: dict[str, float]) -> None:
    into["at"] = wait(lambda: _frames(run) > 0, 120, "first recorded frame", poll_s=0.02)


def wait_for_lease(run: Path):
    from zk0.agent import lease

    deadline = time.monotonic() + 120
    while True:
        held = lease.acquire(f"ipc://{run / 'agent.sock'}", holder="bench", ttl_s=30)
        if isinstance(held, lease.HeldLease):
            return held
        if time.monotonic() > deadline:
            raise TimeoutError(f"no lease: {held.reason}")
        time.sleep(0.5)


def _frames(run: Path) -> int:
    try:
        return int(ask(run, "status", socket="job.sock").get("frames") or 0)
    except (TimeoutError, ValueError):
        return 0


def print_job_log(run: Path, state: Path, lines: int = 40) -> None:
    """Why a trial failed: the agent's state and the end of its newest job log, on stderr."""
    status = ask(run, "status")
    print(f"agent: {status['state']} ({status['reason']})", file=sys.stderr)
    logs = sorted((state / "logs").glob("record-*.log"), key=lambda path: path.stat().st_mtime)
    if logs:
        print(f"{logs[-1]}:\n" + "".join(logs[-1].read_text().splitlines(True)[-lines:]), file=sys.stderr)


def percentiles(values: list[float]) -> dict[str, float]:
    return {"p50": round(float(np.percentile(values, 50)), 3), "p99": round(float(np.percentile(values, 99)), 3),
            "max": round(max(values), 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="zk0-preempt-") as work:
        work = Path(work)
        state, run = work / "state", work / "run"
        config = work / "agent.yaml"
        config.write_text((REPO / "configs" / "agent.yaml").read_text().replace(
            "datasets_root: /var/lib/zk0/datasets", f"datasets_root: {state / 'datasets'}")
            + "idle: {quiet_time_s: 0, max_load_per_core: null, require_ac_power: false}\n")
        seed = subprocess.run([sys.executable, "-m", "zk0.cli", "record", "--sim", "--config", str(config), "--dataset",
                               "train", "--task", TASK, "--episodes", "2", "--episode-time-s", "2", "--reset-time-s", "0",
                               "--no-progress", "--control", f"ipc://{work}/seed.sock"], cwd=REPO, capture_output=True,
                              text=True)
        if seed.returncode != 0:
            print(seed.stderr[-2000:], file=sys.stderr)
            return 1
        with contextlib.redirect_stdout(sys.stderr):  # the tiny VLM's builder prints; stdout is the JSON's
            trainer = make_trainer(state / "datasets" / "train")
        agent = subprocess.Popen([sys.executable, "-m", "zk0.cli", "agent", "--sim", "--config", str(config),
                                  "--state-dir", str(state), "--runtime-dir", str(run)], cwd=REPO,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait(lambda: (run / "agent.sock").exists(), 120, "the agent", poll_s=0.2)
            wait(lambda: all(ask(run, "status").get(key) for key in ("warm_jobs", "sim_rig")), 300,
                 "the agent's warm job process and simulated rig", poll_s=0.5)
            trials = []
            for index in range(args.trials):
                try:
                    trials.append(trial(run, trainer, index))
                except TimeoutError:
                    print_job_log(run, state)
                    raise
                print(f"trial {index + 1}/{args.trials}: " + ", ".join(f"{k} {v:.3f}" for k, v in trials[-1].items()),
                      file=sys.stderr, flush=True)
        finally:
            agent.terminate()
            agent.wait(timeout=120)
    result = {key: percentiles([t[key] for t in trials]) for key in trials[0]}
    result["trials"] = len(trials)
    result["targets"] = {"training_stopped_p99<=1s": result["training_stopped_s"]["p99"] <= 1.0,
                         "teleop_running_p99<=1s": result["teleop_running_s"]["p99"] <= 1.0}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
