"""Test helpers for the validation gate: the scripted operator as a lock-step controller, a small LeRobot
dataset recorded from it in the lock-step simulation (so its camera features are the sim's), and tiny
SmolVLA checkpoints built on that dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from zk0.hw.sim.calibration import MOTOR_NAMES
from zk0.hw.sim.lockstep import LockstepSim, OperatorController

REPO_ID = "local/zk0_validate"
CAMERAS = {"front": (64, 48), "wrist": (64, 48)}
FPS = 30


def record_sim_dataset(root: Path, task: str, episodes: int = 2, seconds: float = 3.0):
    """A LeRobot v3 dataset of the first `seconds` of scripted episodes of `task`, recorded in lock-step,
    whose image features are the sim cameras in CAMERAS (seeds 0, 1, ... as `zk0 record --sim` uses): what a
    policy for the sim needs from a dataset (features, statistics). Returns its metadata."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata

    from zk0.hw.realtime import threads_without_realtime

    names = [f"{name}.pos" for name in MOTOR_NAMES]
    features = {"observation.state": {"dtype": "float32", "shape": (6,), "names": names},
                "action": {"dtype": "float32", "shape": (6,), "names": names}}
    for camera, (width, height) in CAMERAS.items():
        features[f"observation.images.{camera}"] = {"dtype": "video", "shape": (height, width, 3),
                                                    "names": ["height", "width", "channels"]}
    sim = LockstepSim(CAMERAS, FPS)
    controller = OperatorController(sim)
    with threads_without_realtime():
        dataset = LeRobotDataset.create(repo_id=REPO_ID, fps=FPS, features=features, root=root,
                                        robot_type="so101_follower")
        for episode in range(episodes):
            sim.reset(task, episode)
            controller.reset(sim.world.task, episode)
            while sim.ticks < seconds * FPS and not sim.success():
                observation = sim.observe()
                action = controller.act(observation)
                frame = {"observation.state": observation.joints.astype(np.float32),
                         "action": action.astype(np.float32), "task": sim.world.task.instruction}
                frame.update({f"observation.images.{c}": image for c, image in observation.images.items()})
                dataset.add_frame(frame)
                sim.step(action)
            dataset.save_episode()
        dataset.finalize()
    return LeRobotDatasetMetadata(REPO_ID, root=root)


def tiny_checkpoint(out: Path, meta, seed: int) -> Path:
    """A tiny SmolVLA (random weights fixed by `seed`) for the dataset `meta`, saved as a zk0 checkpoint."""
    from zk0.learn.checkpoint import CheckpointMeta, save_checkpoint
    from zk0.learn.policy import PolicySpec, seeded_policy_bundle

    bundle = seeded_policy_bundle(PolicySpec(model="tiny", chunk_size=10, n_action_steps=10), meta, seed)
    save_checkpoint(out, bundle, CheckpointMeta(run=f"tiny-{seed}", round=seed))
    return out
