"""DatasetStore on real LeRobot datasets on disk: rollback of uncommitted tails, refusal of damage, adoption of
lerobot-record datasets, compatibility checks and the disk guard. Tiny frames (one 48x64 video stream)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from lerobot.datasets import LeRobotDataset

from zk0.agent.dataset_commit import DatasetError, DatasetIdentity, EpisodeMeta, read_commit
from zk0.agent.dataset_store import DatasetStore
from zk0.agent.record import CAPTURE_TIME
from zk0.hw.realtime import threads_without_realtime
from zk0.learn.data import ZK0_META_PATH

from tests.agent.conftest import FEATURES

IDENTITY = DatasetIdentity("test-host", "so101", "cafe")
NAME = "store"
FRAMES = 10


def _frame(episode: int, i: int) -> dict:
    return {
        "action": np.full(6, episode, np.float32),
        "observation.state": np.full(6, 100 * episode + i, np.float32),
        "observation.images.front": np.full((48, 64, 3), (40 * episode + 5 * i) % 255, np.uint8),
        CAPTURE_TIME: np.array([i / 30], np.float32),
        "task": "pick the red cube",
    }


def _add_episode(sink: DatasetStore | LeRobotDataset, episode: int) -> None:
    for i in range(FRAMES):
        sink.add_frame(_frame(episode, i))


def _meta(index: int) -> EpisodeMeta:
    return EpisodeMeta(index, FRAMES, "pick the red cube", time.time(), 30.0, 0, 0.5, False, "cafe", seed=index)


def _store_with_episodes(root: Path, count: int) -> DatasetStore:
    store, _ = DatasetStore.open(root, NAME, FEATURES, 30, IDENTITY)
    for _ in range(count):
        _add_episode(store, store.num_episodes)
        store.commit_episode(_meta(store.num_episodes))
    return store


def _load(root: Path) -> LeRobotDataset:
    return LeRobotDataset(f"local/{NAME}", root=root / NAME)


def test_rolls_back_uncommitted_tail_and_appends(tmp_path: Path) -> None:
    store = _store_with_episodes(tmp_path, 1)
    # An episode lerobot saved and finalized, but whose commit never happened (the process died first),
    # plus leftovers of an interrupted encoder and atomic write.
    _add_episode(store, 1)
    dataset = store.writer()
    dataset.save_episode()
    dataset.finalize()
    (tmp_path / NAME / "tmpencoder").mkdir()
    (tmp_path / NAME / "data" / "chunk-000" / "file-009.parquet.tmp").write_bytes(b"PAR1")
    (tmp_path / NAME / "meta" / ".zk0.json.tmp-4242").write_bytes(b"{")  # a commit record's interrupted write
    assert json.loads((tmp_path / NAME / "meta/info.json").read_text())["total_episodes"] == 2

    reopened, report = DatasetStore.open(tmp_path, NAME, FEATURES, 30, IDENTITY)
    assert reopened.num_episodes == 1
    assert any(path.startswith("data/") for path in report.removed)
    assert {"tmpencoder", "data/chunk-000/file-009.parquet.tmp", "meta/.zk0.json.tmp-4242"} <= set(report.removed)
    assert _load(tmp_path).num_episodes == 1

    _add_episode(reopened, 1)
    reopened.commit_episode(_meta(1))
    loaded = _load(tmp_path)
    assert loaded.num_episodes == 2 and len(loaded) == 2 * FRAMES
    assert loaded[FRAMES]["observation.state"][0].item() == 100  # episode 1's first frame, not the rolled-back one's
    assert [e.seed for e in read_commit(tmp_path / NAME).episodes] == [0, 1]


def test_discarded_episode_leaves_nothing(tmp_path: Path) -> None:
    store = _store_with_episodes(tmp_path, 1)
    _add_episode(store, 1)
    store.discard_episode()
    _add_episode(store, 1)
    store.commit_episode(_meta(1))
    store.close()
    assert len(_load(tmp_path)) == 2 * FRAMES


def test_refuses_damaged_committed_episode(tmp_path: Path) -> None:
    _store_with_episodes(tmp_path, 2).close()
    data_files = sorted((tmp_path / NAME / "data").rglob("*.parquet"))
    assert len(data_files) == 2  # zk0 commits each episode into its own files
    data_files[1].write_bytes(data_files[1].read_bytes()[:100])  # a data file without its footer
    commit_before = (tmp_path / NAME / ZK0_META_PATH).read_bytes()

    with pytest.raises(DatasetError) as refused:
        DatasetStore.open(tmp_path, NAME, FEATURES, 30, IDENTITY)
    message = str(refused.value)
    assert "episode 1" in message and "episodes 0..0 are intact" in message
    assert "restore the dataset from a backup or record into a new --dataset name" in message
    assert (tmp_path / NAME / ZK0_META_PATH).read_bytes() == commit_before
    assert data_files[1].exists()  # refusing touches nothing


def _lerobot_record_dataset(root: Path, episodes: int, robot_type: str = "so_follower") -> None:
    """A dataset the way lerobot-record writes one: several episodes, one finalize at the end, no zk0 metadata."""
    # As root, SVT-AV1 would leave real-time threads behind in this (the pytest) process.
    with threads_without_realtime():
        dataset = LeRobotDataset.create(f"local/{NAME}", 30, features=FEATURES, root=root / NAME, robot_type=robot_type, use_videos=True)
        for episode in range(episodes):
            _add_episode(dataset, episode)
            dataset.save_episode()
        dataset.finalize()


def test_adopts_consistent_lerobot_record_dataset(tmp_path: Path) -> None:
    _lerobot_record_dataset(tmp_path, 2)
    store, _ = DatasetStore.open(tmp_path, NAME, FEATURES, 30, IDENTITY)
    assert store.num_episodes == 2 and read_commit(tmp_path / NAME).adopted == 2
    _add_episode(store, 2)
    store.commit_episode(_meta(2))
    store.close()

    # a later session keeps the adopted episodes (they are committed) and the new one
    reopened, _ = DatasetStore.open(tmp_path, NAME, FEATURES, 30, IDENTITY)
    assert reopened.num_episodes == 3
    loaded = _load(tmp_path)
    assert loaded.num_episodes == 3
    assert [loaded[e * FRAMES]["observation.state"][0].item() for e in range(3)] == [0, 100, 200]


@pytest.mark.parametrize(
    ("fps", "identity", "why"),
    [
        (15, IDENTITY, "recorded at 30 fps, this session runs at 15"),
        (30, DatasetIdentity("test-host", "so100", "cafe"), "recorded with robot so101, this host has so100"),
    ],
)
def test_refuses_other_fps_or_robot(tmp_path: Path, fps: int, identity: DatasetIdentity, why: str) -> None:
    _store_with_episodes(tmp_path, 1).close()
    with pytest.raises(DatasetError, match=why):
        DatasetStore.open(tmp_path, NAME, FEATURES, fps, identity)


def test_refuses_to_adopt_other_robot_without_writing(tmp_path: Path) -> None:
    _lerobot_record_dataset(tmp_path, 1, robot_type="koch_follower")
    with pytest.raises(DatasetError, match="recorded with robot koch_follower, this host has so101"):
        DatasetStore.open(tmp_path, NAME, FEATURES, 30, IDENTITY)
    assert not (tmp_path / NAME / ZK0_META_PATH).exists()


def test_disk_guard_refuses_to_start(tmp_path: Path) -> None:
    """A free-space threshold above what the disk has: `zk0 record` refuses with one line and writes nothing."""
    config = tmp_path / "agent.yaml"
    config.write_text(
        "host_id: h\nrobot_type: so101\n"
        "follower: {port: /dev/null, id: f, calibration_dir: /nonexistent}\n"
        "leader: {port: /dev/null, id: l, calibration_dir: /nonexistent}\n"
        f"datasets_root: {tmp_path / 'datasets'}\nrecord: {{min_free_disk_mb: {2**40}}}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "zk0.cli", "record", "--config", str(config), "--sim", "--dataset", NAME,
         "--task", "pick the red cube", "--episodes", "1"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"zk0 record: {tmp_path / 'datasets'}: less than {2**40} MB free; free some space first"
    ]
    assert not (tmp_path / "datasets" / NAME).exists()


def test_recording_leaves_this_process_normally_scheduled(tmp_path: Path) -> None:
    """Encoding as root must leave no real-time thread behind in the calling process (pytest's, here)."""
    _store_with_episodes(tmp_path, 2).close()
    _lerobot_record_dataset(tmp_path / "other", 1)
    assert all(os.sched_getscheduler(int(t)) & ~os.SCHED_RESET_ON_FORK == os.SCHED_OTHER for t in os.listdir("/proc/self/task"))


def test_a_new_dataset_gets_a_random_id_kept_across_commits_and_sessions(tmp_path: Path) -> None:
    from zk0.learn.data import dataset_stable_id

    store = _store_with_episodes(tmp_path, 1)
    dataset_id = read_commit(tmp_path / NAME).dataset_id
    assert len(dataset_id) == 32 and int(dataset_id, 16) >= 0
    assert dataset_stable_id(tmp_path / NAME) == dataset_id
    store.close()
    reopened, _ = DatasetStore.open(tmp_path, NAME, FEATURES, 30, IDENTITY)
    _add_episode(reopened, 1)
    reopened.commit_episode(_meta(1))
    reopened.close()
    assert read_commit(tmp_path / NAME).dataset_id == dataset_id
    other = _store_with_episodes(tmp_path / "elsewhere", 0)
    assert read_commit(other.root).dataset_id != dataset_id


def test_adoption_and_old_records_keep_the_id_their_split_was_drawn_from(tmp_path: Path) -> None:
    """A dataset with episodes but no stored id was split by its derived id; zk0 keeps that id."""
    from zk0.learn.data import dataset_stable_id

    _lerobot_record_dataset(tmp_path, 2)
    before = dataset_stable_id(tmp_path / NAME)
    store, _ = DatasetStore.open(tmp_path, NAME, FEATURES, 30, IDENTITY)
    assert read_commit(tmp_path / NAME).dataset_id == before
    _add_episode(store, 2)
    store.commit_episode(_meta(2))
    store.close()
    assert dataset_stable_id(tmp_path / NAME) == before

    legacy = _store_with_episodes(tmp_path / "legacy", 1)
    legacy.close()
    raw = json.loads((legacy.root / ZK0_META_PATH).read_text())
    del raw["dataset_id"]  # written before zk0 kept ids
    (legacy.root / ZK0_META_PATH).write_text(json.dumps(raw))
    derived = dataset_stable_id(legacy.root)
    DatasetStore.open(tmp_path / "legacy", NAME, FEATURES, 30, IDENTITY)[0].close()
    assert read_commit(legacy.root).dataset_id == derived == dataset_stable_id(legacy.root)
