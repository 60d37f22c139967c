"""The held-out split is fixed per episode for a dataset's life, and the dataset's id survives growth."""

from __future__ import annotations

import json
import shutil

import pytest

from zk0.learn.data import ZK0_META_PATH, dataset_stable_id, derived_dataset_id, split_episodes


def test_split_is_deterministic_disjoint_and_keeps_one_of_each():
    train, held = split_episodes("dataset-a", 10, 0.2)
    assert sorted(train + held) == list(range(10)) and not set(train) & set(held)
    assert (train, held) == split_episodes("dataset-a", 10, 0.2)
    assert 0 in train and 1 in held
    assert split_episodes("a", 2, 0.01) == ([0], [1]) and split_episodes("a", 2, 0.99) == ([0], [1])
    assert split_episodes("a", 1, 0.5) == ([0], [])
    assert split_episodes("a", 50, 0.0) == (list(range(50)), [])
    with pytest.raises(ValueError, match="no episodes"):
        split_episodes("a", 0, 0.2)


def test_an_episode_never_changes_sides_as_the_dataset_grows():
    sides: dict[int, bool] = {}
    for total in range(1, 400):
        train, held = split_episodes("growing", total, 0.2)
        for episode in held:
            assert sides.setdefault(episode, True), f"episode {episode} was trained on, now held out"
        for episode in train:
            assert not sides.setdefault(episode, False), f"episode {episode} was held out, now trained on"


def test_held_out_share_follows_the_fraction_and_differs_between_datasets():
    _, held_a = split_episodes("dataset-a", 2000, 0.2)
    _, held_b = split_episodes("dataset-b", 2000, 0.2)
    assert 0.17 < len(held_a) / 2000 < 0.23 and 0.17 < len(held_b) / 2000 < 0.23
    assert held_a != held_b


def test_stable_id_prefers_the_stored_id_and_else_ignores_added_episodes(dataset_root, tmp_path):
    from tests.learn.conftest import make_dataset

    small, large = tmp_path / "a" / "pick", tmp_path / "b" / "pick"
    make_dataset(small, episodes=2)
    make_dataset(large, episodes=3)
    # no zk0 metadata (lerobot-record's datasets): a digest of what growing does not change, incl. the dir name
    assert dataset_stable_id(small) == dataset_stable_id(large) == derived_dataset_id(small)
    renamed = tmp_path / "c" / "place"
    shutil.copytree(small, renamed)
    assert dataset_stable_id(renamed) != dataset_stable_id(small)
    # zk0's dataset store keeps a random id in meta/zk0.json
    (large / ZK0_META_PATH).write_text(json.dumps({"format": 1, "dataset_id": "0f" * 16}))
    assert dataset_stable_id(large) == "0f" * 16
    (large / ZK0_META_PATH).write_text(json.dumps({"format": 1}))  # a record from before zk0 kept ids
    assert dataset_stable_id(large) == derived_dataset_id(large)


def test_held_out_data_uses_the_stable_split(dataset_root, tiny_setup):
    from zk0.learn.federation import held_out_data

    bundle, _, _ = tiny_setup
    train, held = held_out_data([dataset_root], bundle.policy.config, 0.25)
    expected = split_episodes(dataset_stable_id(dataset_root), 4, 0.25)
    assert (train[0].episode_indices, held[dataset_root.name].episode_indices) == expected
