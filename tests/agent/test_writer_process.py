"""The dataset store in a child process: frames through the shared-memory ring, commits, errors, deaths."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from lerobot.datasets import LeRobotDataset

from zk0.agent.dataset_commit import DatasetError, DatasetIdentity, EpisodeMeta, read_commit
from zk0.agent.dataset_store import DatasetStore, EpisodeRejected
from zk0.agent.record import CAPTURE_TIME
from zk0.agent.video_encoder import StreamingEncoder
from zk0.agent.writer_process import WriterDied, WriterProcess

from tests.agent.conftest import FEATURES

IDENTITY = DatasetIdentity("test-host", "so101", "cafe")
NAME = "ring"


def frame(episode: int, i: int) -> dict:
    return {
        "action": np.full(6, episode, np.float32),
        "observation.state": np.full(6, 100 * episode + i, np.float32),
        "observation.images.front": np.full((48, 64, 3), 10 * i % 250, np.uint8),
        CAPTURE_TIME: np.array([i / 30], np.float32),
        "task": "pick",
    }


def meta(index: int, length: int) -> EpisodeMeta:
    return EpisodeMeta(index, length, "pick", time.time(), 30.0, 0, 0.5, False, "cafe", seed=index)


def record_episode(writer, episode: int, frames: int) -> None:
    for i in range(frames):
        writer.add_frame(frame(episode, i))
    writer.commit_episode(meta(episode, frames))


def test_frames_pass_the_ring_in_order_and_commit(tmp_path: Path) -> None:
    # 4 slots for 25 frames: the ring wraps around several times and the writer must keep up.
    writer, report = WriterProcess.open(tmp_path, NAME, FEATURES, 30, IDENTITY, ring_slots=4)
    with writer:
        assert report is None and writer.num_episodes == 0
        record_episode(writer, 0, 25)
        assert writer.num_episodes == 1
        for i in range(5):
            writer.add_frame(frame(1, i))
        writer.discard_episode()
        record_episode(writer, 1, 10)
    dataset = LeRobotDataset(f"local/{NAME}", root=tmp_path / NAME)
    assert dataset.num_episodes == 2 and len(dataset) == 35
    for i in (0, 7, 24):
        item = dataset[i]
        assert item["observation.state"][0].item() == i
        # AV1 is lossy: a flat image comes back within a few levels of what was written.
        assert abs(item["observation.images.front"].mean().item() * 255 - 10 * i % 250) < 4
    assert dataset[25]["observation.state"][0].item() == 100
    assert not any((Path("/dev/shm") / name.lstrip("/")).exists() for name in writer._ring.names.values())


def test_bad_frame_voids_the_episode_until_discarded(tmp_path: Path) -> None:
    with WriterProcess.open(tmp_path, NAME, FEATURES, 30, IDENTITY)[0] as writer:
        writer.add_frame({**frame(0, 0), "observation.state": np.zeros(5, np.float32)})  # wrong shape
        with pytest.raises(DatasetError, match="observation.state"):
            for i in range(1, 200):  # the error arrives asynchronously, at the latest with the commit
                writer.add_frame(frame(0, i))
            writer.commit_episode(meta(0, 200))
        writer.discard_episode()
        record_episode(writer, 0, 5)
        assert writer.num_episodes == 1


def test_refusal_on_open_is_the_stores(tmp_path: Path) -> None:
    (tmp_path / NAME).mkdir()
    (tmp_path / NAME / "junk").write_text("not a dataset")
    with pytest.raises(DatasetError, match="not a LeRobot dataset"):
        WriterProcess.open(tmp_path, NAME, FEATURES, 30, IDENTITY)


def test_dead_writer_is_reported_and_committed_episodes_survive(tmp_path: Path) -> None:
    writer, _ = WriterProcess.open(tmp_path, NAME, FEATURES, 30, IDENTITY)
    record_episode(writer, 0, 5)
    os.kill(writer._process.pid, signal.SIGKILL)
    writer._process.join()
    with pytest.raises(WriterDied, match="committed episodes .* are intact"):
        for i in range(100):  # frames may still fit the ring; the commit cannot
            writer.add_frame(frame(1, i))
        writer.commit_episode(meta(1, 100))
    writer.close()
    store, _ = DatasetStore.open(tmp_path, NAME, FEATURES, 30, IDENTITY)
    assert store.num_episodes == 1
    store.close()


RECORDER = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    from tests.agent.conftest import FEATURES
    from tests.agent.test_writer_process import IDENTITY, NAME, frame, record_episode
    from zk0.agent.writer_process import WriterProcess

    writer, _ = WriterProcess.open(Path(sys.argv[1]), NAME, FEATURES, 30, IDENTITY)
    record_episode(writer, 0, 5)
    for i in range(8):
        writer.add_frame(frame(1, i))
    print(writer._process.pid, flush=True)
    time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_killed_recorder_stops_its_writer_without_half_episodes(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", RECORDER, str(tmp_path)], capture_output=True, text=True,
                            timeout=120, cwd=Path(__file__).resolve().parents[2], env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    writer_pid = int(result.stdout.split()[0])
    deadline = time.monotonic() + 30
    while _alive(writer_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(writer_pid), "the writer outlived its recorder"
    store, _ = DatasetStore.open(tmp_path, NAME, FEATURES, 30, IDENTITY)
    assert store.num_episodes == 1
    store.close()
    assert LeRobotDataset(f"local/{NAME}", root=tmp_path / NAME).num_episodes == 1


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_episode_with_frames_missing_from_its_video_is_rejected(tmp_path: Path, monkeypatch) -> None:
    """A video shorter than the episode's frames (lerobot's encoder drops frames when its queue is full; any
    encoder could lose some) must never be committed."""
    store, _ = DatasetStore.open(tmp_path, NAME, FEATURES, 30, IDENTITY)
    for i in range(10):
        store.add_frame(frame(0, i))
    store.commit_episode(meta(0, 10))
    feed = StreamingEncoder.feed_frame
    fed = []

    def dropping_feed(self, key, image):  # what lerobot's feed_frame does with a full queue: skip the frame
        fed.append(key)
        if len(fed) <= 20:
            feed(self, key, image)

    monkeypatch.setattr(StreamingEncoder, "feed_frame", dropping_feed)
    for i in range(40):
        store.add_frame(frame(1, i))
    with pytest.raises(EpisodeRejected, match="episode 1: video span"):
        store.commit_episode(meta(1, 40))
    monkeypatch.setattr(StreamingEncoder, "feed_frame", feed)
    assert store.num_episodes == 1 and read_commit(tmp_path / NAME).committed == 1
    for i in range(10):
        store.add_frame(frame(1, i))
    store.commit_episode(meta(1, 10))
    store.close()
    assert LeRobotDataset(f"local/{NAME}", root=tmp_path / NAME).num_episodes == 2


def test_encoder_threads_never_outrank_a_control_loop(tmp_path: Path) -> None:
    """As root SVT-AV1 makes its threads SCHED_FIFO 99; the store starts lerobot's encoders without that right."""
    if os.geteuid() != 0:
        pytest.skip("SVT-AV1 only takes real-time priority as root")
    store, _ = DatasetStore.open(tmp_path, NAME, FEATURES, 30, IDENTITY)
    before = len(os.listdir("/proc/self/task"))
    for i in range(5):
        store.add_frame(frame(0, i))
    deadline = time.monotonic() + 30
    while len(os.listdir("/proc/self/task")) < before + 4 and time.monotonic() < deadline:  # SVT starts its threads
        time.sleep(0.05)
    policies = {int(t): os.sched_getscheduler(int(t)) for t in os.listdir("/proc/self/task")}
    store.discard_episode()
    store.close()
    assert len(policies) >= before + 4
    assert all(policy & ~os.SCHED_RESET_ON_FORK == os.SCHED_OTHER for policy in policies.values())
