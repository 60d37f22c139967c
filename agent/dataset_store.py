"""Local LeRobot v3 datasets, one per name under the datasets root: `DatasetStore` records episodes into one
and commits them one at a time, so a crash loses at most the episode in progress.

The commit record and how a dataset is brought back to its last commit on open: `zk0.agent.dataset_commit`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lerobot.datasets.utils import INFO_PATH

from zk0.agent.dataset_commit import (
    CommitRecord,
    DatasetError,
    DatasetIdentity,
    EpisodeMeta,
    RepairReport,
    check_and_repair,
    inspect_dataset,
    new_dataset_id,
    snapshot_commit,
    write_commit,
)
from zk0.agent.video_encoder import EncodingDataset
from zk0.learn.checkpoint import fsync_tree
from zk0.hw.realtime import threads_without_realtime

FAULT_ENV = "ZK0_FAULT"


def fault_point(name: str) -> None:
    """Crash-test hook: SIGKILL this process at point `name` when $ZK0_FAULT names it."""
    if os.environ.get(FAULT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def free_disk_mb(path: Path) -> float:
    return shutil.disk_usage(path).free / 2**20


@dataclass(frozen=True)
class EncodingSettings:
    video_codec: str = "libsvtav1"
    encoder_threads: int | None = None
    # Frames per camera that may wait for the encoder: the backlog a busy host may build over an episode
    # before the writer (and through its ring, the recorder's loop) waits for the encoder.
    queue_frames: int = 300


class EpisodeRejected(DatasetError):
    """The episode was saved incomplete (e.g. a video shorter than its frames) and was rolled back."""


class DatasetStore:
    """One named dataset, committed episode by episode.

    Usage: `store = DatasetStore.open(...)`, then per episode `store.add_frame(frame)` for each frame, and
    `store.commit_episode(meta)` or `store.discard_episode()`; `store.close()` at the end.
    """

    def __init__(self, root: Path, repo_id: str, identity: DatasetIdentity, record: CommitRecord, encoding: EncodingSettings):
        self.root = root
        self.repo_id = repo_id
        self.identity = identity
        self._record = record
        self._encoding = encoding
        self._dataset: EncodingDataset | None = None

    @classmethod
    def open(
        cls,
        datasets_root: Path,
        name: str,
        features: dict,
        fps: int,
        identity: DatasetIdentity,
        encoding: EncodingSettings = EncodingSettings(),
    ) -> tuple[DatasetStore, RepairReport | None]:
        """Create the dataset `datasets_root/name`, or check, repair and resume it."""
        if not name or "/" in name or name.startswith("."):
            raise DatasetError(f"invalid dataset name {name!r}: use a plain directory name")
        root = Path(datasets_root) / name
        repo_id = f"local/{name}"
        if root.exists() and any(root.iterdir()):
            record, report = check_and_repair(root)
            if record is None:
                record = _adoption_record(root, identity)
            _check_compatible(root, record, features, fps, identity)
            if not record.dataset_id:  # adopted just now, or recorded by zk0 before it kept ids
                record = replace(record, dataset_id=new_dataset_id(root, has_episodes=record.committed > 0))
                write_commit(root, record)
            store = cls(root, repo_id, identity, record, encoding)
            return store, report
        if root.exists():
            root.rmdir()
        root.parent.mkdir(parents=True, exist_ok=True)
        dataset = EncodingDataset.create(
            repo_id, fps, features=features, root=root, robot_type=identity.robot_type, use_videos=True,
            **_writer_kwargs(encoding),
        )
        record = snapshot_commit(root, identity, [], new_dataset_id(root, has_episodes=False))
        write_commit(root, record)
        store = cls(root, repo_id, identity, record, encoding)
        store._dataset = dataset
        return store, None

    @property
    def num_episodes(self) -> int:
        return self._record.committed

    @property
    def episodes(self) -> list[EpisodeMeta]:
        return list(self._record.episodes)

    def writer(self) -> EncodingDataset:
        """The dataset to `add_frame` the current episode into (resumed after every commit)."""
        if self._dataset is None:
            self._dataset = EncodingDataset.resume(self.repo_id, root=self.root, **_writer_kwargs(self._encoding))
        return self._dataset

    @property
    def features(self) -> dict:
        return self.writer().features

    def add_frame(self, frame: dict) -> None:
        dataset = self.writer()
        if dataset.has_pending_frames():
            dataset.add_frame(frame)
            return
        # The first frame starts the episode's encoder threads: keep SVT-AV1 from making them SCHED_FIFO 99.
        with threads_without_realtime():
            dataset.add_frame(frame)

    def discard_episode(self) -> None:
        if self._dataset is not None and self._dataset.has_pending_frames():
            self._dataset.clear_episode_buffer()

    def commit_episode(self, meta: EpisodeMeta) -> None:
        """Save, finalize and commit the episode in the writer; afterwards it survives any crash."""
        dataset = self.writer()
        if meta.episode_index != self.num_episodes:
            raise DatasetError(f"episode {meta.episode_index} committed out of order (expected {self.num_episodes})")
        fault_point("before_save")
        dataset.save_episode()
        fault_point("after_save")
        dataset.finalize()
        self._dataset = None
        fault_point("after_finalize")
        saved = inspect_dataset(self.root, self.num_episodes + 1, first=self.num_episodes)
        if saved.problem:
            check_and_repair(self.root)
            raise EpisodeRejected(f"{saved.problem}; the episode was rolled back, committed episodes are intact")
        fsync_tree(self.root)
        record = snapshot_commit(self.root, self.identity, [*self._record.episodes, meta], self._record.dataset_id,
                                 self._record.adopted)
        write_commit(self.root, record)
        self._record = record

    def close(self) -> None:
        """Drop the episode in progress (if any) and release lerobot's writers."""
        if self._dataset is not None:
            self.discard_episode()
            self._dataset.finalize()
            self._dataset = None


def _writer_kwargs(encoding: EncodingSettings) -> dict[str, Any]:
    from lerobot.configs.video import RGBEncoderConfig

    return {
        "streaming_encoding": True,
        "encoder_threads": encoding.encoder_threads,
        "encoder_queue_maxsize": encoding.queue_frames,
        "rgb_encoder": RGBEncoderConfig(vcodec=encoding.video_codec),
    }


def _adoption_record(root: Path, identity: DatasetIdentity) -> CommitRecord:
    """The first commit record of a consistent dataset recorded outside zk0: all its episodes are kept."""
    info = json.loads((root / INFO_PATH).read_text())
    if not lerobot_robot_matches(info.get("robot_type"), identity.robot_type):
        raise DatasetError(f"{root}: recorded with robot {info.get('robot_type')}, this host has {identity.robot_type}; use another --dataset name")
    return snapshot_commit(root, identity, [], "", adopted=info["total_episodes"])


def lerobot_robot_matches(recorded: str | None, robot_type: str) -> bool:
    """Whether a dataset lerobot recorded (robot_type = the robot class name, e.g. `so_follower` for both
    SO-100 and SO-101, or a config type like `so101_follower`) can take episodes from a `robot_type` arm."""
    return recorded in (robot_type, f"{robot_type}_follower", "so_follower")


def _check_compatible(root: Path, record: CommitRecord, features: dict, fps: int, identity: DatasetIdentity) -> None:
    info = record.info
    if info["fps"] != fps:
        raise DatasetError(f"{root}: recorded at {info['fps']} fps, this session runs at {fps}; use another --dataset name")
    if record.identity.robot_type != identity.robot_type:
        raise DatasetError(f"{root}: recorded with robot {record.identity.robot_type}, this host has {identity.robot_type}")
    for key, feature in features.items():
        have = info["features"].get(key)
        if have is None or (have["dtype"], list(have["shape"])) != (feature["dtype"], list(feature["shape"])):
            raise DatasetError(f"{root}: feature {key!r} differs from this robot's; use another --dataset name")
