"""Sync-read round trip of 6 Present_Position values through lerobot's FeetechMotorsBus on the simulator.

The simulated arm runs as its own process (`zk0 sim arm`), pacing reply bytes at 1 Mbit/s, as the rig does.
Prints one JSON object: median and p99 round trip in milliseconds over `--reads` reads.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=3000)
    parser.add_argument("--baudrate", type=int, default=1_000_000)
    args = parser.parse_args()

    from lerobot.robots.so_follower import SO101FollowerConfig, SOFollower

    with tempfile.TemporaryDirectory() as calibration_dir:
        arm = subprocess.Popen(
            [sys.executable, "-m", "zk0.cli", "sim", "arm", "--role", "follower", "--print-port",
             "--baudrate", str(args.baudrate), "--calibration-dir", calibration_dir, "--id", "bench"],
            stdout=subprocess.PIPE, text=True,
        )
        try:
            port = arm.stdout.readline().strip()
            robot = SOFollower(SO101FollowerConfig(port=port, id="bench", calibration_dir=Path(calibration_dir)))
            robot.connect()
            for _ in range(50):  # warm up caches and the sync reader's parameter list
                robot.bus.sync_read("Present_Position")
            times = np.empty(args.reads)
            for i in range(args.reads):
                started = time.perf_counter()
                robot.bus.sync_read("Present_Position")
                times[i] = time.perf_counter() - started
            robot.disconnect()
        finally:
            arm.terminate()
            arm.wait(timeout=10)

    print(json.dumps({
        "bench": "bus_sync_read_6_present_positions",
        "reads": args.reads,
        "baudrate": args.baudrate,
        "median_ms": round(float(np.median(times)) * 1e3, 3),
        "p99_ms": round(float(np.percentile(times, 99)) * 1e3, 3),
        "max_ms": round(float(times.max()) * 1e3, 3),
        "target_median_ms": 2.0,
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
