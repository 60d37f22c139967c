"""`zk0 demo --arm`: a simulated rig tele-operated through lerobot, saved as one labelled PNG of its cameras.

Starts `zk0 sim rig` (follower + leader + cameras), connects lerobot's own SO-101 follower (with ZMQ
cameras) and leader to it, lets the scripted operator do one pick-and-place episode, and writes the camera
views side by side, labelled with the task and the success verdict, to outputs/.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

LABEL_HEIGHT = 28


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--task", default="pick_place_red", help="the episode's task (default %(default)s)")
    group.add_argument("--seed", type=int, default=0, help="the scene's seed (default %(default)s)")
    group.add_argument("--robot", choices=("so100", "so101"), default="so101")
    group.add_argument("--timeout", type=float, default=30.0, help="longest the episode may run, seconds")
    group.add_argument("--output-dir", type=Path, default=Path("outputs"), help="where the PNG goes")


def compose(frames: dict[str, np.ndarray], caption: list[str]) -> np.ndarray:
    """Camera frames (RGB) side by side, each titled, caption lines underneath; returns BGR for imwrite."""
    import cv2

    height = max(frame.shape[0] for frame in frames.values())
    panels = []
    for name, frame in frames.items():
        panel = np.full((height + LABEL_HEIGHT, frame.shape[1], 3), 255, np.uint8)
        panel[LABEL_HEIGHT : LABEL_HEIGHT + frame.shape[0]] = frame
        cv2.putText(panel, name, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
        panels.append(panel)
    image = np.hstack(panels)
    strip = np.full((LABEL_HEIGHT * len(caption), image.shape[1], 3), 255, np.uint8)
    for row, line in enumerate(caption):
        cv2.putText(strip, line, (6, 20 + row * LABEL_HEIGHT), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return cv2.cvtColor(np.vstack([image, strip]), cv2.COLOR_RGB2BGR)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import cv2
    from lerobot.robots.utils import make_robot_from_config
    from lerobot.teleoperators.utils import make_teleoperator_from_config

    from zk0.hw.sim.rig_handle import RigHandle, teleoperate_episode

    started = time.monotonic()
    with RigHandle.start(robot=args.robot, calibration_dir=args.output_dir / "sim_calibration") as rig:
        robot = make_robot_from_config(rig.follower_config())
        leader = make_teleoperator_from_config(rig.leader_config())
        robot.connect()
        leader.connect()
        try:
            result = teleoperate_episode(rig, robot, leader, args.task, args.seed, timeout_s=args.timeout)
            instruction = rig.snapshot()["instruction"]
        finally:
            robot.disconnect()
            leader.disconnect()
    frames = {camera["name"]: result.observation[camera["name"]] for camera in rig.info["cameras"]}
    verdict = "SUCCESS" if result.success else "not done"
    headline = f"{instruction} (seed {args.seed})"
    outcome = f"{verdict} after {result.duration_s:.1f} s, {result.steps} steps"
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path = args.output_dir / f"demo_{args.task}_seed{args.seed}.png"
    cv2.imwrite(str(path), compose(frames, [headline, outcome]))
    print(f"{headline}: {outcome}\nsaved {path.resolve()} ({time.monotonic() - started:.1f} s in all)")
    return 0 if result.success else 1
