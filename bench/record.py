"""Record loop timing and CPU: `zk0 record` vs `lerobot-record` on the same simulated rig.

One simulated rig (`zk0 sim rig`: follower and leader buses on ptys, two ZMQ cameras, the scripted operator
performing a task) serves both recorders in turn; each records one episode of `--seconds` at `--fps` into
a fresh dataset, as its own process. Measured per recorder:

- on-time fraction: ticks that finished within one period of their deadline, over all ticks. zk0 records
  its overruns per episode; lerobot-record logs one "running slower" warning per late tick.
- loop jitter p50/p99: start of a tick minus its deadline (zk0 only: lerobot-record does not expose it).
- CPU seconds per recorded second: user + system CPU of the recorder process (startup and saving
  included) over the seconds of data it saved (frames / fps).

Prints one JSON object with both recorders' numbers and zk0/lerobot-record ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

LEROBOT_RECORD = Path(sys.executable).with_name("lerobot-record")
TASK = "pick the red cube"
SIM_TASK = "pick_place_red"
SLOW_TICK_WARNING = "Record loop is running slower"


def run_measured(command: list[str], log: Path) -> float:
    """Run `command` to completion, its output to `log`; return its CPU seconds (user + system)."""
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
        _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{command[0]} failed ({os.waitstatus_to_exitcode(status)}); see {log}:\n{log.read_text()[-3000:]}")
    return usage.ru_utime + usage.ru_stime


def zk0_config(rig, datasets_root: Path, fps: int) -> str:
    cameras = "".join(
        f"\n  - {{name: {name}, type: zmq, host: {cam.server_address}, port: {cam.port}, width: {cam.width}, height: {cam.height}, fps: {cam.fps}}}"
        for name, cam in rig.camera_configs().items()
    )
    return (
        f"host_id: bench\nrobot_type: {rig.info['robot']}\n"
        f"follower: {{port: {rig.follower_port}, id: {rig.info['follower_id']}, calibration_dir: {rig.calibration_dir}}}\n"
        f"leader: {{port: {rig.leader_port}, id: {rig.info['leader_id']}, calibration_dir: {rig.calibration_dir}}}\n"
        f"cameras:{cameras}\ndatasets_root: {datasets_root}\n"
        f"record: {{fps: {fps}, min_free_disk_mb: 100}}\n"
        # zk0's default safety envelope stays on: it is part of what zk0 costs (~30 us a tick).
    )


def bench_zk0(rig, work: Path, seconds: float, fps: int) -> dict:
    config = work / "agent.yaml"
    config.write_text(zk0_config(rig, work / "zk0", fps))
    cpu = run_measured(
        [sys.executable, "-m", "zk0.cli", "record", "--config", str(config), "--dataset", "bench", "--task", TASK,
         "--episodes", "1", "--episode-time-s", str(seconds), "--reset-time-s", "0", "--no-progress"],
        work / "zk0.log",
    )
    episode = json.loads((work / "zk0" / "bench" / "meta" / "zk0.json").read_text())["episodes"][0]
    ticks = episode["length"] + episode["failed_ticks"]
    return {
        "frames": episode["length"],
        "failed_ticks": episode["failed_ticks"],
        "on_time_fraction": (episode["length"] - episode["overruns"]) / ticks,
        "jitter_p50_ms": episode["jitter_p50_ms"],
        "jitter_p99_ms": episode["jitter_p99_ms"],
        "achieved_fps": episode["achieved_fps"],
        "cpu_s_per_recorded_s": cpu / (episode["length"] / fps),
    }


def lerobot_cameras(rig) -> str:
    """The rig's cameras as lerobot's `--robot.cameras` value (ZMQ cameras reading the rig's image server)."""
    return ", ".join(
        f"{name}: {{type: zmq, server_address: {cam.server_address}, port: {cam.port}, camera_name: {name}, "
        f"width: {cam.width}, height: {cam.height}, fps: {cam.fps}}}"
        for name, cam in rig.camera_configs().items()
    )


def bench_lerobot(rig, work: Path, seconds: float, fps: int) -> dict:
    robot = rig.info["robot"]
    cameras = lerobot_cameras(rig)
    root = work / "lerobot"
    log = work / "lerobot-record.log"
    cpu = run_measured(
        [str(LEROBOT_RECORD), f"--robot.type={robot}_follower", f"--robot.port={rig.follower_port}",
         f"--robot.id={rig.info['follower_id']}", f"--robot.calibration_dir={rig.calibration_dir}",
         f"--robot.cameras={{{cameras}}}", f"--teleop.type={robot}_leader", f"--teleop.port={rig.leader_port}",
         f"--teleop.id={rig.info['leader_id']}", f"--teleop.calibration_dir={rig.calibration_dir}",
         "--dataset.repo_id=local/bench", f"--dataset.root={root}", f"--dataset.fps={fps}",
         "--dataset.num_episodes=1", f"--dataset.episode_time_s={seconds}", "--dataset.reset_time_s=0",
         f"--dataset.single_task={TASK}", "--dataset.push_to_hub=false", "--dataset.streaming_encoding=true",
         "--display_data=false", "--play_sounds=false"],
        log,
    )
    frames = sum(pq.read_metadata(path).num_rows for path in (root / "data").rglob("*.parquet"))
    late = log.read_text().count(SLOW_TICK_WARNING)
    return {
        "frames": frames,
        "on_time_fraction": (frames - late) / frames,
        "jitter_p50_ms": None,
        "jitter_p99_ms": None,
        "achieved_fps": frames / seconds,
        "cpu_s_per_recorded_s": cpu / (frames / fps),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="episode length per recorder (default %(default)s)")
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    args = parser.parse_args()

    from zk0.hw.sim.rig_handle import RigHandle

    with tempfile.TemporaryDirectory(prefix="zk0-bench-record-") as tmp:
        work = Path(tmp)
        with RigHandle.start(fps=args.fps, width=args.width, height=args.height, calibration_dir=work / "calibration") as rig:
            results = {}
            for name, bench in (("lerobot_record", bench_lerobot), ("zk0_record", bench_zk0)):
                rig.reset(SIM_TASK, seed=0)
                rig.start_operator()
                started = time.perf_counter()
                results[name] = bench(rig, work, args.seconds, args.fps)
                results[name]["wall_s"] = round(time.perf_counter() - started, 1)
                rig.stop_operator()
    zk0, lerobot = results["zk0_record"], results["lerobot_record"]
    print(json.dumps({
        "seconds": args.seconds, "fps": args.fps, "cameras": f"2x {args.width}x{args.height}",
        "load_average_1m": os.getloadavg()[0], "cpus": os.cpu_count(),
        # As root, SVT-AV1 runs its encoder threads SCHED_FIFO 99 (lerobot-record's too) and zk0's loop is real-time.
        "root": os.geteuid() == 0,
        "zk0_record": zk0, "lerobot_record": lerobot,
        "ratios_zk0_over_lerobot": {
            "on_time_fraction": zk0["on_time_fraction"] / lerobot["on_time_fraction"] if lerobot["on_time_fraction"] else None,
            "cpu_s_per_recorded_s": zk0["cpu_s_per_recorded_s"] / lerobot["cpu_s_per_recorded_s"],
        },
        "targets_met": {
            "on_time_fraction>=0.999": zk0["on_time_fraction"] >= 0.999,
            "jitter_p99_ms<5": zk0["jitter_p99_ms"] < 5.0,
            "cpu<=lerobot_record": zk0["cpu_s_per_recorded_s"] <= lerobot["cpu_s_per_recorded_s"],
        },
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
