"""The sim base's vision stage: freshly rendered scenes with their scene vectors, and a tower that learns from them
while the rest of the policy stays as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zk0.hw.sim.world import World
from zk0.learn import sim_base, sim_demos
from zk0.learn.vision_pretrain import VISION_SEED_BASE, VISION_SEED_SPAN, SceneRenderer, pretrain_vision

CAMERAS = {"front": (32, 24), "wrist": (32, 24)}
TASKS = ("pick_place_red", "push_blue_left")


def _poses() -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.uniform(-0.4, 0.4, size=(20, 6))


def test_vision_scenes_are_disjoint_from_the_base_demonstrations():
    recipe = sim_base.with_knobs(sim_base.PRESETS["sim-base"], demos_per_task=sim_base.TASK_SEED_STRIDE)
    assert max(seed for _, seed in sim_base.demo_plan(recipe)) < VISION_SEED_BASE
    assert VISION_SEED_SPAN > 0


def test_same_seed_renders_the_same_scenes_and_targets_say_where_things_are():
    first, targets = SceneRenderer(CAMERAS, _poses(), TASKS, seed=5).batch(6)
    again, targets_again = SceneRenderer(CAMERAS, _poses(), TASKS, seed=5).batch(6)
    other, other_targets = SceneRenderer(CAMERAS, _poses(), TASKS, seed=6).batch(6)
    for name, (width, height) in CAMERAS.items():
        images = first[sim_demos.IMAGE_PREFIX + name]
        assert images.shape == (6, 3, height, width) and 0.0 <= float(images.min()) <= float(images.max()) <= 1.0
        assert torch.equal(images, again[sim_demos.IMAGE_PREFIX + name])
    assert first[sim_demos.STATE].shape == (6, 6)
    assert torch.equal(targets, targets_again) and not torch.equal(targets, other_targets)
    assert targets.shape == (6, sim_demos.SCENE_DIMS)
    # scenes differ from one another within a batch
    assert len({tuple(row.tolist()) for row in targets}) == 6


def test_a_scene_target_is_the_world_it_rendered():
    scenes = SceneRenderer(CAMERAS, _poses(), TASKS, seed=9)
    _, target = scenes.batch(1)
    assert np.allclose(target[0].numpy(), sim_demos.scene_vector(scenes.world))
    assert VISION_SEED_BASE <= scenes.world.seed < VISION_SEED_BASE + VISION_SEED_SPAN


def test_placing_the_arm_moves_no_cube():
    world = World("pick_place_red", 11)
    cubes = {name: cube.position.copy() for name, cube in world.cubes.items()}
    world.place_arm(np.array([0.3, -0.2, 0.4, 0.1, 0.0, 0.2]))
    assert np.allclose(world.joints, [0.3, -0.2, 0.4, 0.1, 0.0, 0.2])
    assert all(np.array_equal(world.cubes[name].position, where) for name, where in cubes.items())
    with pytest.raises(ValueError):
        world.place_arm(np.zeros(5))


def test_nothing_to_render_from_is_refused():
    with pytest.raises(ValueError, match="arm poses and tasks"):
        SceneRenderer(CAMERAS, np.zeros((0, 6)), TASKS, seed=0)
    with pytest.raises(ValueError, match="arm poses and tasks"):
        SceneRenderer(CAMERAS, _poses(), (), seed=0)


def test_only_the_vision_tower_and_connector_learn_and_a_stop_ends_it():
    shape = sim_base.PRESETS["sim-base"].shape
    demos = sim_demos.record_demos([("push_red_left", 0)], shape.camera_sizes(), image_stride=10)
    meta, _ = sim_demos.demo_meta(demos, shape.camera_sizes())
    policy = sim_base.new_policy(shape, meta, 1, {"freeze_vision_encoder": True, "train_expert_only": True}).policy
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    scenes = SceneRenderer(shape.camera_sizes(), demos[0].state, TASKS, seed=2)
    losses = pretrain_vision(policy, scenes, steps=3, batch_size=4, lr=1e-3, progress=lambda: False)
    after = policy.state_dict()
    assert len(losses) == 3 and all(np.isfinite(losses))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(".vision_model." in k for k in changed) and any(".connector." in k for k in changed)
    assert all(".vision_model." in k or ".connector." in k for k in changed)
    calls = iter([False, True])
    assert len(pretrain_vision(policy, scenes, steps=5, batch_size=2, lr=1e-3, progress=lambda: next(calls))) == 1
    assert pretrain_vision(policy, scenes, steps=0, batch_size=2, lr=1e-3, progress=lambda: False) == []


def test_a_base_with_a_vision_stage_keeps_the_tower_that_stage_trained(monkeypatch):
    recipe = sim_base.with_knobs(sim_base.PRESETS["sim-base"], tasks=("push_red_left",), demos_per_task=1, steps=3,
                                 batch_size=4, warmup_steps=1, vision_steps=2, vision_batch_size=2)
    demos = sim_demos.record_demos(sim_base.demo_plan(recipe), recipe.shape.camera_sizes(), image_stride=10)
    after_stage_one = {}
    real = sim_base.pretrain_vision

    def keeping_the_tower(policy, *args, **kwargs):
        losses = real(policy, *args, **kwargs)
        after_stage_one.update({k: v.clone() for k, v in policy.state_dict().items() if ".vision_model." in k})
        return losses

    monkeypatch.setattr(sim_base, "pretrain_vision", keeping_the_tower)
    bundle, _, losses, scene_losses, _ = sim_base.train_base(recipe, demos, seed=4)
    final = bundle.policy.state_dict()
    assert after_stage_one and all(torch.equal(final[k], v) for k, v in after_stage_one.items())
    assert len(losses) == len(scene_losses) == recipe.steps
    assert bundle.policy.config.freeze_vision_encoder and bundle.policy.config.train_expert_only
