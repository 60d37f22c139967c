"""Training data for SmolVLA from a local LeRobot v3 dataset: episode split, batches, and a decoded-frame cache.

lerobot's `LeRobotDataset.__getitem__` seeks into the video and decodes the camera frames again for every
sample, every step. A round of local training revisits the same few episodes many times, so here each
episode's video is decoded once, sequentially (far cheaper than random seeks), resized-with-padding to the
policy's input size exactly as SmolVLA does, and kept as uint8 in a `zk0.learn.frame_cache.FrameCache`.
State/action arrays come straight from the dataset's parquet columns, and the action chunk + `action_is_pad` are
built as lerobot's delta-timestamp logic builds them (indices clamped to the episode, padded ones flagged).
Batches are the dict lerobot's DataLoader would collate, ready for the policy's pre-processor.

The held-out split is fixed per episode for a dataset's life (`split_episodes` over `dataset_stable_id`), so a
growing dataset never moves an episode between training and evaluation.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zk0.learn.frame_cache import FrameCache

STATE = "observation.state"
ACTION = "action"
# zk0's commit record of a dataset (zk0.agent.dataset_commit) and the key of the id it stores.
ZK0_META_PATH = "meta/zk0.json"
DATASET_ID_KEY = "dataset_id"


def derived_dataset_id(root: Path) -> str:
    """The id of a dataset that zk0 never stored one for (e.g. written by lerobot-record).

    A digest of what adding episodes never changes: the dataset directory's name and info.json's fps,
    robot_type and every feature's dtype, shape and names (not lerobot's per-feature "info", which it fills in
    when the first video is encoded). Renaming the directory or changing a feature gives a new id.
    """
    info = json.loads((root / "meta" / "info.json").read_text())
    features = {name: {key: spec.get(key) for key in ("dtype", "shape", "names")}
                for name, spec in info["features"].items()}
    identity = {"name": root.resolve().name, "fps": info.get("fps"), "robot_type": info.get("robot_type"),
                "features": features}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def dataset_stable_id(root: Path) -> str:
    """The id a dataset keeps for life: its held-out split and the id its node reports derive from it.

    zk0's dataset store writes a random id into meta/zk0.json when it creates a dataset (and the derived id when
    it adopts one recorded elsewhere, so adoption does not move the split); datasets zk0 never opened get
    `derived_dataset_id`. Unlike `dataset_fingerprint`, it does not change as episodes are added.
    """
    meta = root / ZK0_META_PATH
    if meta.is_file():
        stored = json.loads(meta.read_text()).get(DATASET_ID_KEY)
        if stored:
            return str(stored)
    return derived_dataset_id(root)


def _episode_draw(dataset_id: str, episode: int) -> float:
    """A uniform value in [0, 1) fixed by (dataset, episode): the same on every host and as the dataset grows."""
    digest = hashlib.sha256(f"{dataset_id}/{episode}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _is_held_out(dataset_id: str, episode: int, eval_fraction: float) -> bool:
    if eval_fraction <= 0 or episode == 0:
        return False
    return episode == 1 or _episode_draw(dataset_id, episode) < eval_fraction


def split_episodes(dataset_id: str, num_episodes: int, eval_fraction: float) -> tuple[list[int], list[int]]:
    """(train, held-out) episode indices, each episode's side fixed for the dataset's life.

    Episode 0 always trains and episode 1 is always held out (two episodes give one of each); every later episode
    is held out iff its draw from SHA-256(dataset id, index) is below `eval_fraction`. An episode therefore never
    changes sides as episodes are added: a held-out loss never includes frames an earlier round trained on.
    eval_fraction <= 0 holds nothing out.
    """
    if num_episodes < 1:
        raise ValueError("the dataset has no episodes")
    held = [ep for ep in range(num_episodes) if _is_held_out(dataset_id, ep, eval_fraction)]
    train = sorted(set(range(num_episodes)) - set(held))
    return train, held


@dataclass
class _Episode:
    state: np.ndarray  # (T, state_dim) float32
    action: np.ndarray  # (T, action_dim) float32
    timestamps: np.ndarray  # (T,) seconds from the episode start
    task: str


class EpisodeData:
    """The episodes of one local LeRobot dataset, served as policy-ready batches.

    `image_size` is (height, width) of SmolVLA's input (its `resize_imgs_with_padding`, reversed), so cached
    frames need no further resizing in the model.
    """

    def __init__(self, root: str | Path, chunk_size: int, image_size: tuple[int, int], cache: FrameCache,
                 episodes: list[int] | None = None, repo_id: str | None = None):
        from lerobot.datasets.lerobot_dataset import LeRobotDataset

        self.root = Path(root)
        if not (self.root / "meta" / "info.json").is_file():
            raise FileNotFoundError(f"{self.root}: not a LeRobot dataset (no meta/info.json)")
        self.dataset = LeRobotDataset(repo_id or f"local/{self.root.name}", root=self.root)
        self.meta = self.dataset.meta
        self.chunk_size = chunk_size
        self.image_size = image_size
        self.cache = cache
        self.cache.bind(self.root)
        self.camera_keys = list(self.meta.video_keys)
        self.episode_indices = list(range(self.meta.total_episodes)) if episodes is None else list(episodes)
        self._episodes = self._load_tables()

    def _load_tables(self) -> dict[int, _Episode]:
        table = self.dataset.hf_dataset.with_format(None)
        columns = {name: table[name] for name in ("episode_index", "timestamp", STATE, ACTION, "task_index")}
        episode_of = np.asarray(columns["episode_index"])
        tasks = self.meta.tasks
        task_names = {int(i): name for name, i in zip(tasks.index, tasks["task_index"], strict=True)}
        out = {}
        for ep in self.episode_indices:
            rows = np.flatnonzero(episode_of == ep)
            if rows.size == 0:
                raise ValueError(f"{self.root}: episode {ep} has no frames")
            out[ep] = _Episode(
                state=np.asarray([columns[STATE][i] for i in rows], dtype=np.float32),
                action=np.asarray([columns[ACTION][i] for i in rows], dtype=np.float32),
                timestamps=np.asarray([columns["timestamp"][i] for i in rows], dtype=np.float64),
                task=task_names[int(columns["task_index"][rows[0]])],
            )
        return out

    @property
    def num_frames(self) -> int:
        return sum(len(e.timestamps) for e in self._episodes.values())

    def subset(self, episodes: list[int]) -> EpisodeData:
        view = object.__new__(EpisodeData)
        view.__dict__.update(self.__dict__)
        view.episode_indices = list(episodes)
        view._episodes = {ep: self._episodes[ep] for ep in episodes}
        return view

    def frame_index(self) -> list[tuple[int, int]]:
        """Every (episode, frame) sample, in order."""
        return [(ep, i) for ep in self.episode_indices for i in range(len(self._episodes[ep].timestamps))]

    def _decode(self, episode: int, camera: str) -> np.ndarray:
        from lerobot.datasets.video_utils import decode_video_frames
        from lerobot.policies.common.vla_utils import resize_with_pad

        ep_meta = self.meta.episodes[episode]
        offset = ep_meta[f"videos/{camera}/from_timestamp"]
        timestamps = (offset + self._episodes[episode].timestamps).tolist()
        path = self.root / self.meta.get_video_file_path(episode, camera)
        frames = decode_video_frames(path, timestamps, self.dataset.tolerance_s)
        frames = resize_with_pad(frames, *self.image_size, pad_value=0)
        return (frames.clamp(0, 1) * 255).round().to(torch.uint8).numpy()

    def frames(self, episode: int, camera: str) -> np.ndarray:
        key = (str(self.root.resolve()), episode, camera, self.image_size)
        return self.cache.get_or_decode(key, lambda: self._decode(episode, camera))

    def batch(self, samples: list[tuple[int, int]]) -> dict[str, Any]:
        """The collated batch lerobot's DataLoader would produce for these (episode, frame) samples."""
        offsets = np.arange(self.chunk_size)
        states, actions, pads, tasks = [], [], [], []
        images: dict[str, list[np.ndarray]] = {cam: [] for cam in self.camera_keys}
        for ep, i in samples:
            episode = self._episodes[ep]
            length = len(episode.timestamps)
            idx = i + offsets
            states.append(episode.state[i])
            actions.append(episode.action[np.minimum(idx, length - 1)])
            pads.append(idx >= length)
            tasks.append(episode.task)
            for cam in self.camera_keys:
                images[cam].append(self.frames(ep, cam)[i])
        batch: dict[str, Any] = {
            STATE: torch.from_numpy(np.stack(states)),
            ACTION: torch.from_numpy(np.stack(actions)),
            "action_is_pad": torch.from_numpy(np.stack(pads)),
            "task": tasks,
        }
        for cam, frames in images.items():
            batch[cam] = torch.from_numpy(np.stack(frames)).float().div_(255.0)
        return batch


def policy_image_size(policy_config: Any) -> tuple[int, int]:
    """(height, width) SmolVLA resizes camera images to; its config stores (width, height)."""
    width, height = policy_config.resize_imgs_with_padding
    return int(height), int(width)


class ConcatData:
    """Several datasets with the same features served as one: samples are (dataset, episode, frame)."""

    def __init__(self, parts: list[EpisodeData]):
        keys = {tuple(sorted(p.camera_keys)) for p in parts}
        if len(keys) != 1:
            raise ValueError(f"datasets have different cameras: {sorted(keys)}")
        self.parts = parts

    def frame_index(self) -> list[tuple[int, int, int]]:
        return [(k, ep, i) for k, part in enumerate(self.parts) for ep, i in part.frame_index()]

    def batch(self, samples: list[tuple[int, int, int]]) -> dict[str, Any]:
        pieces = [self.parts[k].batch([(ep, i)]) for k, ep, i in samples]
        return {key: (sum((p[key] for p in pieces), []) if key == "task" else torch.cat([p[key] for p in pieces]))
                for key in pieces[0]}
