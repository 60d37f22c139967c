"""Scripted demonstrations: what a recording keeps per tick, and the batches they are served as (the keys,
chunking and padding recorded datasets are served with)."""

from __future__ import annotations

import numpy as np
import pytest

from zk0.learn import sim_demos

CAMERAS = {"front": (128, 96), "wrist": (128, 96)}


def test_demo_batches_chunk_and_pad_as_recorded_datasets_do():
    state = np.arange(12, dtype=np.float32).reshape(6, 2)
    images = {"front": np.zeros((6, 3, 4, 4), dtype=np.uint8)}
    demo = sim_demos.Demo("push the red cube left", 0, state, state + 100, images, True,
                         np.zeros((6, sim_demos.SCENE_DIMS), dtype=np.float32))
    data = sim_demos.DemoData([demo], chunk_size=4)
    batch = data.batch([(0, 4)])
    assert batch["action"][0, :, 0].tolist() == [108.0, 110.0, 110.0, 110.0]  # the last action repeats
    assert batch["action_is_pad"][0].tolist() == [False, False, True, True]
    assert batch["observation.state"][0].tolist() == [8.0, 9.0]
    assert batch["observation.images.front"].shape == (1, 3, 4, 4) and batch["task"] == ["push the red cube left"]
    assert data.scene_targets([(0, 4)]).shape == (1, sim_demos.SCENE_DIMS)


def test_image_stride_keeps_every_nth_picture_and_samples_only_those_ticks():
    every = sim_demos.record_demos([("push_red_left", 0)], CAMERAS)[0]
    strided = sim_demos.record_demos([("push_red_left", 0)], CAMERAS, image_stride=4)[0]
    ticks = len(every.state)
    assert np.array_equal(strided.state, every.state) and np.array_equal(strided.action, every.action)
    for camera, frames in every.images.items():
        assert np.array_equal(strided.images[camera], frames[::4])  # the same pictures, every 4th tick
    data = sim_demos.DemoData([strided], chunk_size=4)
    assert data.frame_index() == [(0, i) for i in range(0, ticks, 4)]
    batch = data.batch([(0, 8)])
    assert np.array_equal(batch["observation.images.front"][0].mul(255).round().byte().numpy(),
                          every.images["front"][8])
    with pytest.raises(ValueError, match="image_stride"):
        sim_demos.record_demos([("push_red_left", 0)], CAMERAS, image_stride=0)
