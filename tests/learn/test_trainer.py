import numpy as np
import torch

from zk0.learn.frame_cache import FrameCache, dataset_fingerprint
from zk0.learn.evaluate import evaluate_loss
from zk0.learn.policy import load_trainable_state, trainable_state
from zk0.learn.trainer import LocalTrainer, TrainerConfig


def test_batches_match_lerobot_dataset_items(tiny_setup, dataset_root):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    bundle, train, _ = tiny_setup
    chunk = bundle.policy.config.chunk_size
    fps = 30
    reference = LeRobotDataset("local/zk0_test", root=dataset_root,
                               delta_timestamps={"action": [i / fps for i in range(chunk)]})
    ep = train.episode_indices[0]
    start = reference.meta.episodes[ep]["dataset_from_index"]
    last = reference.meta.episodes[ep]["dataset_to_index"] - 1 - start
    batch = train.batch([(ep, last)])
    item = reference[start + last]
    torch.testing.assert_close(batch["observation.state"][0], item["observation.state"])
    torch.testing.assert_close(batch["action"][0], item["action"])
    assert torch.equal(batch["action_is_pad"][0], item["action_is_pad"])
    assert batch["task"][0] == item["task"]
    # cached frames are lerobot's decoded frames, resized-with-padding as SmolVLA does, within uint8 rounding
    from lerobot.policies.common.vla_utils import resize_with_pad

    expected = resize_with_pad(item["observation.images.front"][None], *train.image_size, pad_value=0)[0]
    assert (batch["observation.images.front"][0] - expected).abs().max() <= 1 / 255 + 1e-6


def test_training_lowers_held_out_loss_and_reports_true_counts(tiny_setup):
    bundle, train, held = tiny_setup
    before, _ = evaluate_loss(bundle.policy, bundle.preprocessor, held)
    global_state = trainable_state(bundle.policy)
    trainer = LocalTrainer(bundle.policy, bundle.preprocessor, train, TrainerConfig(batch_size=8, seed=0))
    result = trainer.train(global_state, steps=40, lr=3e-3, mu=0.01)
    after, _ = evaluate_loss(bundle.policy, bundle.preprocessor, held)
    assert after < before
    assert result.steps_done == 40 and result.examples == 320 and len(result.losses) == 40
    assert result.update_norm > 0 and result.proximal_loss > 0
    assert set(result.state) == set(global_state)
    load_trainable_state(bundle.policy, global_state)  # restore for the other tests in this module


def test_preemption_returns_partial_update_with_true_counts(tiny_setup):
    bundle, train, _ = tiny_setup
    start = trainable_state(bundle.policy)
    polls = []
    trainer = LocalTrainer(bundle.policy, bundle.preprocessor, train, TrainerConfig(batch_size=4, seed=1))
    progress = []
    result = trainer.train(start, steps=50, lr=1e-3, should_stop=lambda: polls.append(1) or len(polls) > 3,
                           on_step=lambda done, loss: progress.append((done, loss)))
    assert result.steps_done == 3 and result.examples == 12
    assert progress == list(enumerate(result.losses, start=1))  # after every step, with that step's loss
    assert any(not torch.equal(result.state[k], start[k]) for k in start)
    now = trainable_state(bundle.policy)
    assert all(torch.equal(result.state[k], now[k]) for k in now)  # the update is the policy's current state
    load_trainable_state(bundle.policy, start)


def test_frame_cache_reuses_decoded_frames_and_drops_them_when_the_dataset_changes(tiny_setup, dataset_root):
    _, train, _ = tiny_setup
    cache = FrameCache(memory_bytes=1 << 26)
    view = train.subset(train.episode_indices)
    view.cache = cache
    cache.bind(view.root)
    samples = view.frame_index()[:6]
    view.batch(samples)
    misses = cache.misses
    view.batch(samples)
    assert cache.misses == misses and cache.hits > 0 and cache.size_bytes > 0
    info = dataset_root / "meta" / "info.json"
    before = dataset_fingerprint(dataset_root)
    info.touch()
    assert dataset_fingerprint(dataset_root) != before
    cache.bind(dataset_root)
    assert cache.size_bytes == 0


def test_frame_cache_respects_its_memory_budget(tiny_setup):
    _, train, _ = tiny_setup
    one_episode = train.frames(train.episode_indices[0], train.camera_keys[0]).nbytes
    cache = FrameCache(memory_bytes=one_episode)
    for k in range(3):
        cache.get_or_decode(("r", k, "cam", (1, 1)), lambda: np.zeros(one_episode, np.uint8))
    assert cache.size_bytes <= one_episode and cache.misses == 3
