"""SIGKILL the dataset writer at several points; reopening must keep every committed episode and append after them."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.agent.conftest import WRITER, run_writer
from lerobot.datasets import LeRobotDataset

from zk0.agent.dataset_commit import read_commit

NAME = "crashy"

# Each case starts writer processes that import torch and lerobot: tens of seconds on a loaded host.
pytestmark = pytest.mark.slow


def _load(root: Path) -> LeRobotDataset:
    return LeRobotDataset(f"local/{NAME}", root=root / NAME)


def _assert_episodes(root: Path, count: int, frames: int = 20) -> None:
    dataset = _load(root)
    assert dataset.num_episodes == count
    assert len(dataset) == count * frames
    for episode in range(count):
        first = dataset[episode * frames]
        assert first["episode_index"].item() == episode
        assert first["observation.state"][0].item() == 100 * episode  # positional lookups hit the right episode
        assert first["observation.images.front"].shape == (3, 48, 64)
    record = read_commit(root / NAME)
    assert [e.seed for e in record.episodes] == list(range(count))


@pytest.mark.parametrize("fault", ["before_save", "after_save", "after_finalize"])
def test_kill_during_save_keeps_committed_episodes(tmp_path: Path, fault: str) -> None:
    assert run_writer(tmp_path, NAME, episodes=2).returncode == 0
    killed = run_writer(tmp_path, NAME, episodes=1, fault=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert "frames 2" in killed.stdout and "committed 2" not in killed.stdout

    resumed = run_writer(tmp_path, NAME, episodes=1)  # opening repairs; then a new episode appends
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_episodes(tmp_path, 3)
    info = json.loads((tmp_path / NAME / "meta/info.json").read_text())
    assert (info["total_episodes"], info["total_frames"]) == (3, 60)


def test_kill_in_first_episode_of_new_dataset(tmp_path: Path) -> None:
    killed = run_writer(tmp_path, NAME, episodes=1, fault="after_save")
    assert killed.returncode == -signal.SIGKILL
    assert run_writer(tmp_path, NAME, episodes=2).returncode == 0
    _assert_episodes(tmp_path, 2)


def test_kill_mid_episode_while_encoding(tmp_path: Path) -> None:
    """SIGKILL from outside while frames stream into lerobot's encoder threads."""
    assert run_writer(tmp_path, NAME, episodes=1).returncode == 0
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path), NAME, "1", "100000"], stdout=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not list((tmp_path / NAME).glob("tmp*")) and time.monotonic() < deadline:
        time.sleep(0.05)  # the streaming encoder's temporary directory: encoding is under way
    time.sleep(0.5)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert list((tmp_path / NAME).glob("tmp*")), "the encoder never started"

    assert run_writer(tmp_path, NAME, episodes=1).returncode == 0
    _assert_episodes(tmp_path, 2)
    assert not list((tmp_path / NAME).glob("tmp*"))
