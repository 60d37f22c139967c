"""zk0's streaming camera encoder: exact image statistics, no dropped frames, failures reported, clean cancel."""

from __future__ import annotations

import os
import time
from pathlib import Path

import av
import numpy as np
import pytest
from lerobot.configs.video import RGBEncoderConfig
from lerobot.datasets import LeRobotDataset
from lerobot.datasets.compute_stats import RunningQuantileStats, auto_downsample_height_width

from zk0.agent import video_encoder
from zk0.agent.dataset_commit import DatasetIdentity, EpisodeMeta
from zk0.agent.dataset_store import DatasetStore
from zk0.agent.record import CAPTURE_TIME
from zk0.agent.video_encoder import ENCODER_NICENESS, PixelStats, StreamingEncoder

from tests.agent.conftest import FEATURES

KEY = "observation.images.front"


def images(count: int, height: int = 480, width: int = 640, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # A different skewed distribution per channel, so quantiles and channel order matter.
    return [
        np.stack([(rng.beta(2 + c, 5, (height, width)) * 255).astype(np.uint8) for c in range(3)], axis=-1)
        for _ in range(count)
    ]


def sampled_pixels(frames: list[np.ndarray]) -> np.ndarray:
    """(pixels, 3): every frame downsampled as lerobot samples images for statistics."""
    return np.concatenate([auto_downsample_height_width(f.transpose(2, 0, 1)).reshape(3, -1).T for f in frames])


def test_pixel_stats_are_exact() -> None:
    frames = images(4)
    stats = PixelStats()
    for f in frames:
        stats.update(f)
    pixels = sampled_pixels(frames).astype(np.float64)
    result = stats.statistics()
    assert result["count"].tolist() == [len(pixels)]
    np.testing.assert_array_equal(result["min"], pixels.min(axis=0))
    np.testing.assert_array_equal(result["max"], pixels.max(axis=0))
    np.testing.assert_allclose(result["mean"], pixels.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(result["std"], pixels.std(axis=0), rtol=1e-9)
    for key, q in (("q01", 0.01), ("q10", 0.10), ("q50", 0.50), ("q90", 0.90), ("q99", 0.99)):
        np.testing.assert_array_equal(result[key], np.quantile(pixels, q, axis=0, method="inverted_cdf"), err_msg=key)


def test_pixel_stats_agree_with_lerobots_running_quantile_stats() -> None:
    """The numbers lerobot's own streaming encoder would store, within its histogram's resolution."""
    frames = images(3, seed=1)
    ours, theirs = PixelStats(), RunningQuantileStats()
    for f in frames:
        ours.update(f)
        theirs.update(auto_downsample_height_width(f.transpose(2, 0, 1)).transpose(1, 2, 0).reshape(-1, 3))
    ours, theirs = ours.statistics(), theirs.get_statistics()
    assert set(ours) == set(theirs)
    for key in theirs:
        np.testing.assert_allclose(ours[key], theirs[key], atol=0.1, rtol=1e-5, err_msg=key)


def decoded_frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def test_a_slow_encoder_makes_the_feeder_wait_and_loses_no_frame(tmp_path: Path, monkeypatch) -> None:
    """lerobot's encoder drops frames when its queue is full; zk0's waits (the recorder counts late ticks)."""
    add_stream = video_encoder._CameraEncoder._add_stream

    def slow_to_start(self, container, frame):
        time.sleep(0.5)  # the queue (2 frames) fills while the codec starts
        return add_stream(self, container, frame)

    monkeypatch.setattr(video_encoder._CameraEncoder, "_add_stream", slow_to_start)
    encoder = StreamingEncoder(30, RGBEncoderConfig(), queue_frames=2, encoder_threads=1)
    encoder.start_episode([KEY], tmp_path)
    frames = [np.full((48, 64, 3), 8 * i, np.uint8) for i in range(20)]
    started = time.monotonic()
    for f in frames:
        encoder.feed_frame(KEY, f)
        f[:] = 255  # the caller may reuse its buffer at once
    assert time.monotonic() - started >= 0.4
    (path, stats), = encoder.finish_episode().values()
    decoded = decoded_frames(path)
    assert len(decoded) == 20
    means = [d.mean() for d in decoded]
    assert means == sorted(means) and abs(means[0] - 0) < 4 and abs(means[-1] - 152) < 4
    assert stats["count"].tolist() == [20 * 48 * 64] and stats["max"].tolist() == [152.0] * 3


def test_encoder_failure_is_raised_to_the_feeder_with_the_camera_named(tmp_path: Path, monkeypatch) -> None:
    def broken(self, container, frame):
        raise av.error.ValueError(22, "injected codec failure")

    monkeypatch.setattr(video_encoder._CameraEncoder, "_add_stream", broken)
    encoder = StreamingEncoder(30, RGBEncoderConfig(), queue_frames=4, encoder_threads=1)
    encoder.start_episode([KEY], tmp_path)
    with pytest.raises(RuntimeError, match=f"video encoder for {KEY}.*injected codec failure"):
        for _ in range(100):
            encoder.feed_frame(KEY, np.zeros((48, 64, 3), np.uint8))
            time.sleep(0.01)
    encoder.cancel_episode()
    assert not list(tmp_path.iterdir())


def test_encoder_threads_and_the_codec_threads_they_start_run_at_the_lowest_priority(tmp_path: Path) -> None:
    before = set(os.listdir("/proc/self/task"))
    encoder = StreamingEncoder(30, RGBEncoderConfig(), queue_frames=4, encoder_threads=2)
    encoder.start_episode([KEY], tmp_path)
    for i in range(5):
        encoder.feed_frame(KEY, np.full((48, 64, 3), i, np.uint8))
    deadline = time.monotonic() + 30
    while len(set(os.listdir("/proc/self/task")) - before) < 3 and time.monotonic() < deadline:  # SVT starts its threads
        time.sleep(0.05)
    niceness = {}
    for thread in set(os.listdir("/proc/self/task")) - before:
        try:
            niceness[thread] = os.getpriority(os.PRIO_PROCESS, int(thread))
        except ProcessLookupError:
            continue
    encoder.finish_episode()
    assert len(niceness) >= 3 and set(niceness.values()) == {ENCODER_NICENESS}
    assert os.getpriority(os.PRIO_PROCESS, 0) == 0  # the feeding thread keeps its own


def test_bad_images_are_refused_by_name(tmp_path: Path) -> None:
    encoder = StreamingEncoder(30, RGBEncoderConfig(), queue_frames=4, encoder_threads=1)
    encoder.start_episode([KEY], tmp_path)
    with pytest.raises(ValueError, match=f"{KEY}: expected a \\(height, width, 3\\) uint8 image, got float32"):
        encoder.feed_frame(KEY, np.zeros((48, 64, 3), np.float32))
    with pytest.raises(ValueError, match="got uint8 \\(3, 48, 64\\)"):
        encoder.feed_frame(KEY, np.zeros((3, 48, 64), np.uint8))
    encoder.close()


def test_cancel_removes_the_partial_video_and_the_next_episode_starts_clean(tmp_path: Path) -> None:
    encoder = StreamingEncoder(30, RGBEncoderConfig(), queue_frames=600, encoder_threads=1)
    encoder.start_episode([KEY], tmp_path)
    for i in range(200):  # far more than it encodes before the cancel
        encoder.feed_frame(KEY, np.full((48, 64, 3), i, np.uint8))
    encoder.cancel_episode()
    assert not list(tmp_path.iterdir())
    encoder.start_episode([KEY], tmp_path)
    for i in range(5):
        encoder.feed_frame(KEY, np.full((48, 64, 3), 50 * i, np.uint8))
    (path, stats), = encoder.finish_episode().values()
    assert len(decoded_frames(path)) == 5 and stats["max"].tolist() == [200.0] * 3
    encoder.close()


def test_datasets_written_through_the_store_carry_lerobot_shaped_image_stats(tmp_path: Path) -> None:
    store, _ = DatasetStore.open(tmp_path, "stats", FEATURES, 30, DatasetIdentity("test-host", "so101", "cafe"))
    for i in range(12):
        store.add_frame({
            "action": np.zeros(6, np.float32), "observation.state": np.zeros(6, np.float32),
            KEY: np.full((48, 64, 3), (0, 100, 200), np.uint8) + np.uint8(i), CAPTURE_TIME: np.array([i / 30], np.float32),
            "task": "pick",
        })
    store.commit_episode(EpisodeMeta(0, 12, "pick", time.time(), 30.0, 0, 0.5, False, "cafe"))
    store.close()
    stats = LeRobotDataset("local/stats", root=tmp_path / "stats").meta.stats[KEY]
    assert stats["mean"].shape == (3, 1, 1)
    np.testing.assert_allclose(stats["mean"].ravel(), (np.array([0, 100, 200]) + 5.5) / 255, rtol=1e-6)
    np.testing.assert_allclose(stats["min"].ravel(), np.array([0, 100, 200]) / 255)
    np.testing.assert_allclose(stats["max"].ravel(), np.array([11, 111, 211]) / 255)
