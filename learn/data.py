"""Training data for SmolVLA from a local LeRobot v3 dataset: episode split, batches, and a decoded-frame cache.

lerobot's `LeRobotDataset.__getitem__` seeks into the video and decodes the camera frames again for every
sample, every step. A round of local training revisits the same few episodes many times, so here each
episode's video is decoded once, sequentially (far cheaper than random seeks), resized-with-padding to the
policy's input size exactly as SmolVLA does, and kept as uint8 in a `FrameCache` bounded in memory (and
optionally spilled to disk). State/action arrays come straight from the dataset's parquet columns, and the
action chunk + `action_is_pad` are built as lerobot's delta-timestamp logic builds them (indices clamped to
the episode, padded ones flagged). Batches are the dict lerobot's DataLoader would collate, ready for the
policy's pre-processor.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE = "observation.state"
ACTION = "action"


def split_episodes(num_episodes: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) episode indices: a seeded shuffle; at least one of each when there are >= 2 episodes."""
    if num_episodes < 1:
        raise ValueError("the dataset has no episodes")
    order = np.random.default_rng(seed).permutation(num_episodes).tolist()
    if num_episodes == 1 or eval_fraction <= 0:
        return sorted(order), []
    n_eval = min(num_episodes - 1, max(1, round(num_episodes * eval_fraction)))
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def dataset_fingerprint(root: Path) -> str:
    """Changes whenever episodes are added or data/video files are rewritten."""
    h = hashlib.sha256(str(root.resolve()).encode())
    for path in sorted([root / "meta" / "info.json", *root.glob("meta/episodes/**/*.parquet"),
                        *root.glob("videos/**/*.mp4"), *root.glob("data/**/*.parquet")]):
        st = path.stat()
        h.update(f"{path.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


class FrameCache:
    """Decoded, resized uint8 camera frames per (dataset, episode, camera), LRU-bounded in bytes.

    With `disk_dir`, frames evicted from (or never fitting in) memory are kept as .npy files under a
    per-dataset-fingerprint folder within `disk_bytes`; a dataset whose fingerprint changes gets a new folder
    and its old entries are dropped from memory.
    """

    def __init__(self, memory_bytes: int = 1 << 30, disk_dir: str | Path | None = None, disk_bytes: int = 0):
        self.memory_bytes = memory_bytes
        self.disk_dir = Path(disk_dir) if disk_dir else None
        self.disk_bytes = disk_bytes
        self._memory: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._fingerprints: dict[str, str] = {}
        self.hits = 0
        self.misses = 0

    @property
    def size_bytes(self) -> int:
        return sum(a.nbytes for a in self._memory.values())

    def _disk_used(self) -> int:
        return sum(p.stat().st_size for p in self.disk_dir.rglob("*.npy")) if self.disk_dir else 0

    def bind(self, root: Path) -> str:
        """Register a dataset's current fingerprint, forgetting its frames if the dataset changed."""
        key = str(root.resolve())
        fingerprint = dataset_fingerprint(root)
        if self._fingerprints.get(key) != fingerprint:
            for k in [k for k in self._memory if k[0] == key]:
                del self._memory[k]
            self._fingerprints[key] = fingerprint
        return fingerprint

    def _disk_path(self, key: tuple) -> Path | None:
        if self.disk_dir is None:
            return None
        root, episode, camera, size = key
        name = f"ep{episode:06d}_{camera}_{size[0]}x{size[1]}.npy"
        return self.disk_dir / self._fingerprints[root] / name

    def get_or_decode(self, key: tuple, decode) -> np.ndarray:
        frames = self._memory.get(key)
        if frames is not None:
            self._memory.move_to_end(key)
            self.hits += 1
            return frames
        path = self._disk_path(key)
        if path is not None and path.is_file():
            frames = np.load(path)
            self.hits += 1
        else:
            frames = decode()
            self.misses += 1
            if path is not None and self._disk_used() + frames.nbytes <= self.disk_bytes:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp.npy")
                np.save(tmp, frames)
                tmp.replace(path)
        if frames.nbytes <= self.memory_bytes:
            self._memory[key] = frames
            while self.size_bytes > self.memory_bytes:
                self._memory.popitem(last=False)
        return frames


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
