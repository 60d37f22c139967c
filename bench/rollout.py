"""Rollout loop timing and CPU: `zk0 rollout` (sync and RTC engines) vs `lerobot-rollout` on the same simulated rig.

A tiny SmolVLA (zk0.learn.policy "tiny", seeded) is built for a dataset recorded with `zk0 record --sim`
(or `--policy DIR` names a checkpoint), and one simulated rig (`zk0 sim rig`, two ZMQ cameras, bus trace on)
serves each rollout in turn, each its own process running `--seconds` at `--fps`:

- zk0 on time / jitter p50, p99: from zk0's own loop (ticks finished within one period of their deadline;
  start minus deadline), as `zk0 rollout --report` gives them.
- bus cadence (both): from the rig's bus trace, the interval between consecutive goal writes of the
  follower: the share within 1.5 periods (a tick that sent a fresh goal on time) and |interval - period|
  p50/p99. For zk0 a tick with no fresh action sends nothing, so this also counts slow inference.
- lerobot-rollout on time: 1 - its "running slower" warnings / its ticks (its goal writes on the bus; base
  strategy, sync engine; it exposes no jitter). Its duration starts before its first, cold inference.
- inference latency p50/p99 (zk0): per engine call for sync (one call in n_action_steps computes a chunk),
  per chunk for RTC.
- CPU seconds per rollout second: user + system CPU of the rollout process (imports, model load, warm-up
  included) over `--seconds`.

Prints one JSON object. Only meaningful on a quiet machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# bench/ is sys.path[0] when this script runs: the record benchmark's process and config helpers.
from record import lerobot_cameras, run_measured, zk0_config

LEROBOT_ROLLOUT = Path(sys.executable).with_name("lerobot-rollout")
TASK = "pick the red cube"
SIM_TASK = "pick_place_red"
SLOW_TICK_WARNING = "Record loop is running slower"


def build_policy(work: Path) -> Path:
    """A tiny seeded policy for a one-episode dataset recorded on a fresh simulated rig."""
    import subprocess

    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata

    from zk0.learn.checkpoint import CheckpointMeta, save_checkpoint
    from zk0.learn.policy import PolicySpec, seeded_policy_bundle

    config = Path(__file__).resolve().parents[1] / "configs" / "agent.yaml"
    subprocess.run([sys.executable, "-m", "zk0.cli", "record", "--sim", "--config", str(config), "--root", str(work),
                    "--dataset", "seed", "--task", TASK, "--episodes", "1", "--episode-time-s", "1",
                    "--reset-time-s", "0", "--no-progress", "--control", f"ipc://{work}/record.sock"],
                   check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    meta = LeRobotDatasetMetadata("local/seed", root=work / "seed")
    save_checkpoint(work / "policy", seeded_policy_bundle(PolicySpec(model="tiny"), meta, seed=0),
                    CheckpointMeta(run="bench", round=0))
    return work / "policy"


def bus_cadence(trace: Path, since: float, until: float, fps: int) -> dict:
    """Follower goal writes (one sync write of servo 1 per tick) between two Unix times."""
    times = np.array([r["t"] for r in map(json.loads, trace.read_text().splitlines())
                      if r["arm"] == "follower" and r["register"] == "Goal_Position" and r["id"] == 1
                      and since <= r["t"] <= until])
    if len(times) < 2:
        return {"goal_writes": int(len(times))}
    intervals = np.diff(times)
    jitter_ms = np.abs(intervals - 1 / fps) * 1e3
    return {"goal_writes": int(len(times)), "on_time_fraction": float(np.mean(intervals <= 1.5 / fps)),
            "interval_jitter_p50_ms": float(np.percentile(jitter_ms, 50)),
            "interval_jitter_p99_ms": float(np.percentile(jitter_ms, 99))}


def bench_zk0(rig, work: Path, policy: Path, inference: str, seconds: float, fps: int) -> dict:
    config = work / "agent.yaml"
    # A slow inference shows as held ticks, not as a run the watchdog ended (1 s without an action, by default).
    config.write_text(zk0_config(rig, work / "datasets", fps)
                      + "rollout: {watchdog_torque_off_s: 30.0}\n")
    report = work / f"zk0-{inference}.json"
    cpu = run_measured(
        [sys.executable, "-m", "zk0.cli", "rollout", "--config", str(config), "--policy", str(policy), "--task", TASK,
         "--inference", inference, "--episodes", "1", "--episode-time-s", str(seconds), "--report", str(report),
         "--control", f"ipc://{work}/ctl.sock"],
        work / f"zk0-{inference}.log",
    )
    result = json.loads(report.read_text())
    episode = result["episodes"][0]
    timing = episode["timing"]
    return {
        "ticks": timing["ticks"],
        "on_time_fraction": timing["on_time_fraction"],
        "jitter_p50_ms": timing["jitter_p50_ms"], "jitter_p99_ms": timing["jitter_p99_ms"],
        "inference_p50_ms": episode["inference_ms"][0], "inference_p99_ms": episode["inference_ms"][1],
        "held_ticks": episode["held_ticks"], "ended": episode["ended"],
        "cpu_s_per_s": cpu / seconds,
    }


def bench_lerobot(rig, work: Path, policy: Path, seconds: float, fps: int) -> dict:
    robot = rig.info["robot"]
    cameras = lerobot_cameras(rig)
    log = work / "lerobot-rollout.log"
    cpu = run_measured(
        [str(LEROBOT_ROLLOUT), "--strategy.type=base", f"--policy.path={policy}", "--inference.type=sync",
         f"--robot.type={robot}_follower", f"--robot.port={rig.follower_port}", f"--robot.id={rig.info['follower_id']}",
         f"--robot.calibration_dir={rig.calibration_dir}", f"--robot.cameras={{{cameras}}}", f"--task={TASK}",
         f"--fps={fps}", f"--duration={seconds}", "--return_to_initial_position=false", "--play_sounds=false",
         "--device=cpu"],
        log,
    )
    return {"late_ticks": log.read_text().count(SLOW_TICK_WARNING), "cpu_s_per_s": cpu / seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="rollout length per run (default %(default)s)")
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--policy", type=Path, help="checkpoint to roll out (default: a tiny policy built here)")
    args = parser.parse_args()

    from zk0.hw.sim.rig_handle import RigHandle

    with tempfile.TemporaryDirectory(prefix="zk0-bench-rollout-") as tmp:
        work = Path(tmp)
        with contextlib.redirect_stdout(sys.stderr):  # lerobot prints while building; stdout is the JSON
            policy = args.policy or build_policy(work / "build")
        trace = work / "trace.jsonl"
        runs = {
            "zk0_rollout_sync": lambda rig: bench_zk0(rig, work, policy, "sync", args.seconds, args.fps),
            "zk0_rollout_rtc": lambda rig: bench_zk0(rig, work, policy, "rtc", args.seconds, args.fps),
            "lerobot_rollout_sync": lambda rig: bench_lerobot(rig, work, policy, args.seconds, args.fps),
        }
        results = {}
        with RigHandle.start(fps=args.fps, width=args.width, height=args.height, calibration_dir=work / "calibration",
                             bus_trace=trace) as rig:
            for name, bench in runs.items():
                rig.reset(SIM_TASK, seed=0)
                started = time.time()
                results[name] = bench(rig)
                results[name]["wall_s"] = round(time.time() - started, 1)
                results[name]["bus"] = (started, time.time())
        for result in results.values():  # the rig flushes its trace on close
            result["bus"] = bus_cadence(trace, *result["bus"], args.fps)
    lerobot = results["lerobot_rollout_sync"]
    # lerobot-rollout's ticks are its goal writes (one per tick, the sync engine always has an action).
    lerobot["on_time_fraction"] = 1 - lerobot["late_ticks"] / max(lerobot["bus"]["goal_writes"], 1)
    print(json.dumps({
        "seconds": args.seconds, "fps": args.fps, "cameras": f"2x {args.width}x{args.height}",
        "load_average_1m": os.getloadavg()[0], "cpus": os.cpu_count(), "root": os.geteuid() == 0,
        **results,
        "targets_met": {
            name: {"on_time_fraction>=0.999": results[name]["on_time_fraction"] >= 0.999,
                   "jitter_p99_ms<5": results[name]["jitter_p99_ms"] < 5.0,
                   "cpu<=lerobot_rollout": results[name]["cpu_s_per_s"] <= lerobot["cpu_s_per_s"]}
            for name in ("zk0_rollout_sync", "zk0_rollout_rtc")
        },
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
