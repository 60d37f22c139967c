"""Real LeRobot v3 datasets and a tiny SmolVLM directory on disk, shared by the learning tests.

`make_dataset` writes a small SO-101-shaped dataset of one task (random starts, one goal) whose camera images
are a function of the arm state, so a policy can learn something from it that holds on held-out episodes. It
stands in for `zk0 record --sim` output until that exists; the fixtures only depend on its signature.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

JOINTS = ["shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper"]
TASK = "pick the red cube and place it in the bin"
TASK_GOAL = np.array([15.0, -25.0, 30.0, 10.0, 0.0, 20.0])  # joints (deg) and gripper (0..100) at the bin


def _features(height: int, width: int) -> dict:
    names = [f"{j}.pos" for j in JOINTS]
    features = {
        "observation.state": {"dtype": "float32", "shape": (6,), "names": names},
        "action": {"dtype": "float32", "shape": (6,), "names": names},
    }
    for camera in ("front", "wrist"):
        features[f"observation.images.{camera}"] = {
            "dtype": "video",
            "shape": (height, width, 3),
            "names": ["height", "width", "channels"],
        }
    return features


def _render(state: np.ndarray, height: int, width: int, phase: int) -> np.ndarray:
    """A blob whose position and color follow the joints, so images carry the state."""
    image = np.zeros((height, width, 3), dtype=np.uint8)
    cy = int((0.5 + 0.4 * np.tanh(state[1] / 45.0)) * (height - 1))
    cx = int((0.5 + 0.4 * np.tanh(state[0] / 45.0)) * (width - 1))
    r = max(3, height // 8)
    y0, y1, x0, x1 = max(0, cy - r), min(height, cy + r), max(0, cx - r), min(width, cx + r)
    image[y0:y1, x0:x1] = (200, int(2.5 * state[5]) % 256, 60 + 40 * phase)
    return image


def make_dataset(
    root: str | Path,
    episodes: int = 4,
    frames: int = 24,
    height: int = 48,
    width: int = 64,
    seed: int = 0,
    repo_id: str = "local/zk0_test",
):
    """Write a LeRobot v3 dataset of `episodes` smooth reaching motions at `root` and return it (read mode)."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    rng = np.random.default_rng(seed)
    dataset = LeRobotDataset.create(
        repo_id=repo_id, fps=30, features=_features(height, width), root=root, robot_type="so101_follower"
    )
    t = np.linspace(0.0, 1.0, frames, dtype=np.float32)[:, None]
    for _ in range(episodes):
        # One task, as in a real dataset: random starts, all reaching (nearly) the same goal, so what a policy
        # learns from some episodes carries over to the others.
        start = rng.uniform(-40, 40, size=6).astype(np.float32)
        goal = (TASK_GOAL + rng.uniform(-3, 3, size=6)).astype(np.float32)
        start[5] = rng.uniform(0, 100)
        states = start + (goal - start) * (3 * t**2 - 2 * t**3)
        actions = np.vstack([states[1:], states[-1:]])
        for i in range(frames):
            dataset.add_frame(
                {
                    "observation.state": states[i],
                    "action": actions[i],
                    "observation.images.front": _render(states[i], height, width, 0),
                    "observation.images.wrist": _render(states[i][::-1].copy(), height, width, 1),
                    "task": TASK,
                }
            )
        dataset.save_episode()
    dataset.finalize()
    return LeRobotDataset(repo_id, root=root)


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory) -> Path:
    from zk0.learn.tiny_vlm import write_tiny_vlm

    return write_tiny_vlm(tmp_path_factory.mktemp("tiny_vlm"))


@pytest.fixture(scope="session")
def dataset_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("datasets") / "so101_pick"
    make_dataset(root)
    return root


@pytest.fixture(scope="module")
def tiny_setup(dataset_root):
    """A fresh tiny SmolVLA on dataset_root with its train / held-out episode data (one per test module)."""
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata

    from zk0.learn.data import EpisodeData, dataset_stable_id, policy_image_size, split_episodes
    from zk0.learn.frame_cache import FrameCache
    from zk0.learn.policy import PolicySpec, seeded_policy_bundle

    meta = LeRobotDatasetMetadata("local/zk0_test", root=dataset_root)
    # seeded: the same initial weights whichever tests ran before
    bundle = seeded_policy_bundle(PolicySpec(model="tiny", chunk_size=10, n_action_steps=10), meta, seed=0)
    data = EpisodeData(dataset_root, bundle.policy.config.chunk_size, policy_image_size(bundle.policy.config),
                       FrameCache())
    train_eps, eval_eps = split_episodes(dataset_stable_id(dataset_root), meta.total_episodes, 0.25)
    return bundle, data.subset(train_eps), data.subset(eval_eps)
