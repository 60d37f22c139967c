"""Frame cache: the disk tier stays within its budget (least recently used first, stale datasets at once)
without rescanning its folder per frame, and `sized_frame_cache` sizes both tiers from the datasets."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from zk0.learn import frame_cache as frame_cache_module
from zk0.learn.data import EpisodeData
from zk0.learn.frame_cache import FrameCache, frames_bytes, sized_frame_cache

ENTRY = 1000  # bytes of one synthetic entry's frames


def _key(root: Path, episode: int) -> tuple:
    return (str(root.resolve()), episode, "front", (10, 10))


def _frames(episode: int) -> np.ndarray:
    return np.full(ENTRY, episode, np.uint8)


def _files(disk_dir: Path) -> set[str]:
    return {p.name for p in disk_dir.rglob("*.npy")}


def _entry_bytes(tmp_path: Path) -> int:
    probe = tmp_path / "probe.npy"
    np.save(probe, _frames(0))
    return probe.stat().st_size


@pytest.fixture
def dataset_copy(dataset_root, tmp_path) -> Path:
    return Path(shutil.copytree(dataset_root, tmp_path / "datasets" / "pick"))


def test_disk_tier_evicts_least_recently_used_files_within_its_budget(dataset_copy, tmp_path):
    disk = tmp_path / "frame-cache"
    budget = 2 * _entry_bytes(tmp_path)
    cache = FrameCache(memory_bytes=0, disk_dir=disk, disk_bytes=budget)
    cache.bind(dataset_copy)
    for episode in (0, 1):
        cache.get_or_decode(_key(dataset_copy, episode), lambda e=episode: _frames(e))
    time.sleep(0.01)
    assert cache.get_or_decode(_key(dataset_copy, 0), pytest.fail)[0] == 0  # a disk hit, now the most recent
    cache.get_or_decode(_key(dataset_copy, 2), lambda: _frames(2))
    assert _files(disk) == {"ep000000_front_10x10.npy", "ep000002_front_10x10.npy"}
    assert cache.disk_used_bytes == budget and cache.misses == 3 and cache.hits == 1

    # another process (Flower's next ClientApp) sees the same order through the files' mtimes
    later = FrameCache(memory_bytes=0, disk_dir=disk, disk_bytes=budget)
    later.bind(dataset_copy)
    assert later.disk_used_bytes == budget
    later.get_or_decode(_key(dataset_copy, 3), lambda: _frames(3))
    assert _files(disk) == {"ep000002_front_10x10.npy", "ep000003_front_10x10.npy"}

    # a smaller budget is enforced as soon as a cache opens the folder
    FrameCache(memory_bytes=0, disk_dir=disk, disk_bytes=budget // 2)
    assert _files(disk) == {"ep000003_front_10x10.npy"}


def test_a_changed_dataset_drops_its_old_disk_folder_at_once(dataset_copy, tmp_path):
    disk = tmp_path / "frame-cache"
    cache = FrameCache(memory_bytes=0, disk_dir=disk, disk_bytes=1 << 20)
    old = cache.bind(dataset_copy)
    cache.get_or_decode(_key(dataset_copy, 0), lambda: _frames(0))
    assert [p.name for p in disk.glob("*/*")] == [old]
    os.utime(dataset_copy / "meta" / "info.json")  # the dataset grew: its old frames can never be hit again
    fresh = FrameCache(memory_bytes=0, disk_dir=disk, disk_bytes=1 << 20)
    new = fresh.bind(dataset_copy)
    assert new != old and not list(disk.glob("*/*")) and fresh.disk_used_bytes == 0
    fresh.get_or_decode(_key(dataset_copy, 0), lambda: _frames(7))
    assert [p.name for p in disk.glob("*/*")] == [new] and fresh.misses == 1


def test_the_hot_path_never_rescans_the_disk_tier(dataset_copy, tmp_path, monkeypatch):
    cache = FrameCache(memory_bytes=2 * ENTRY, disk_dir=tmp_path / "frame-cache", disk_bytes=1 << 20)
    cache.bind(dataset_copy)

    def no_scan(*_args, **_kwargs):
        raise AssertionError("the frame cache walked its folder on the hot path")

    monkeypatch.setattr(Path, "rglob", no_scan)
    monkeypatch.setattr(Path, "glob", no_scan)
    monkeypatch.setattr(os, "scandir", no_scan)
    for episode in range(5):
        cache.get_or_decode(_key(dataset_copy, episode), lambda e=episode: _frames(e))
    for episode in range(5):
        assert cache.get_or_decode(_key(dataset_copy, episode), pytest.fail)[0] == episode
    assert cache.misses == 5 and cache.hits == 5 and cache.size_bytes == 2 * ENTRY


def test_sized_cache_holds_every_frame_of_the_datasets(dataset_root, tmp_path):
    need = frames_bytes((64, 64), [dataset_root])
    assert need == 4 * 24 * 2 * 64 * 64 * 3  # episodes x frames x cameras x H x W x RGB
    cache = sized_frame_cache((64, 64), [dataset_root], disk_dir=None)
    assert (cache.memory_bytes, cache.disk_bytes, cache.disk_dir) == (need, 0, None)
    assert sized_frame_cache((64, 64), [dataset_root], tmp_path / "d").disk_bytes == need
    assert sized_frame_cache((64, 64), [dataset_root], tmp_path / "d", 12345).disk_bytes == 12345

    data = EpisodeData(dataset_root, 10, (64, 64), cache)
    samples = data.frame_index()
    for _ in range(2):
        data.batch(samples)
    assert cache.misses == 4 * 2 and cache.size_bytes == need  # each episode and camera decoded once


def test_a_memory_tier_too_small_for_the_working_set_is_logged(dataset_root, monkeypatch, caplog):
    monkeypatch.setattr(frame_cache_module, "_available_memory", lambda: 1_000_000)
    with caplog.at_level(logging.WARNING, logger="zk0.learn.frame_cache"):
        cache = sized_frame_cache((64, 64), [dataset_root], disk_dir=None)
    assert cache.memory_bytes == 250_000
    assert "frame cache" in caplog.text and "64x64" in caplog.text
