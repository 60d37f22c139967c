"""The sim-base preset: its seeds, its shape, a reproducible build, and fine-tuning from it with the VLM frozen.

Builds use the real pipeline (lock-step scripted demonstrations, SmolVLA, the trainer, checkpoints) at a
size that runs in seconds: one task, one demonstration, a few steps.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from zk0.agent.validate import VALIDATION_SEED_BASE
from zk0.learn import sim_base, sim_demos
from zk0.learn.checkpoint import load_checkpoint, read_meta

SMALL = sim_base.with_knobs(sim_base.PRESETS["sim-base"], tasks=("push_red_left",), demos_per_task=1, steps=3,
                            batch_size=4, warmup_steps=1)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, sim_base.BuildReport]:
    out = tmp_path_factory.mktemp("sim_base") / "base"
    return out, sim_base.build_sim_base(out, SMALL, seed=7)


def test_demo_seeds_cover_every_task_and_avoid_recording_validation_and_bench_seeds():
    from zk0.hw.sim.tasks import TASKS

    recipe = sim_base.with_knobs(sim_base.PRESETS["sim-base"], demos_per_task=1000)
    plan = sim_base.demo_plan(recipe)
    assert {task for task, _ in plan} == set(TASKS)
    seeds = [seed for _, seed in plan]
    assert len(set(seeds)) == len(seeds)
    # zk0 record keeps to [0, 1e6), zk0 validate uses 1e6 + i, bench/task_discrimination.py 2e6 + i
    assert min(seeds) >= 3 * VALIDATION_SEED_BASE


def test_preset_is_small_and_sees_the_recorded_cameras():
    shape = sim_base.PRESETS["sim-base"].shape
    assert shape.vlm.image_size >= max(w for _, w, _ in shape.cameras)  # padded, never shrunk
    assert shape.vlm.image_size % (shape.vlm.patch_size * shape.vlm.scale_factor) == 0
    assert {name for name, _, _ in shape.cameras} <= {"front", "top", "wrist"}
    assert shape.chunk_size == 50  # what zk0 train / the federation use for a model given by path


def test_command_rebuilds_it_bit_for_bit_from_the_seed_and_another_seed_differs(built, tmp_path, monkeypatch,
                                                                                 capsys):
    import argparse
    import json

    from zk0.learn import model_cli

    out, report = built
    monkeypatch.setitem(sim_base.PRESETS, "sim-base", SMALL)  # the preset's size, not its 10-minute build
    assert model_cli.run(argparse.Namespace(kind="sim-base", out_dir=str(tmp_path / "again"), seed=7)) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    other = sim_base.build_sim_base(tmp_path / "other", SMALL, seed=8)
    assert printed["sha256"] == report.sha256 == read_meta(out).sha256 == read_meta(tmp_path / "again").sha256
    assert other.sha256 != report.sha256
    assert report.successful_demos == 1 and len(report.losses) == len(report.scene_losses) == SMALL.steps


def test_pretraining_trains_the_vlm_and_the_saved_base_freezes_it(built, tmp_path):
    out, _ = built
    demos = sim_demos.record_demos(sim_base.demo_plan(SMALL), SMALL.shape.camera_sizes())
    meta, _ = sim_demos.demo_meta(demos, SMALL.shape.camera_sizes())
    fresh = sim_base.new_policy(SMALL.shape, meta, 7, sim_base.pretrain_overrides(SMALL))
    initial = {k: v.clone() for k, v in fresh.policy.state_dict().items()}
    saved = _tensors(out)
    vision = [k for k in saved if ".vision_model." in k and k.endswith("weight")]
    assert vision and any(not torch.equal(saved[k], initial[k]) for k in vision)  # the vision tower learned
    config = load_checkpoint(out)[0].policy.config
    assert config.freeze_vision_encoder and config.train_expert_only
    assert config.optimizer_lr == SMALL.finetune_lr
    assert not any(".vlm." in name for name in read_meta(out).trainable)


def test_base_loads_with_lerobot_and_fine_tunes_only_the_action_expert(built):
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    from zk0.learn import stats as fedstats
    from zk0.learn.federation import policy_spec
    from zk0.learn.policy import seeded_policy_bundle, trainable_names
    from zk0.learn.trainer import LocalTrainer, TrainerConfig

    out, _ = built
    saved = _tensors(out)
    lerobot_policy = SmolVLAPolicy.from_pretrained(str(out))
    assert all(torch.equal(lerobot_policy.state_dict()[k], v) for k, v in saved.items())

    # a host's data (other scenes, its own normalization), built as `zk0 train --model BASE` builds it
    demos = sim_demos.record_demos([("push_red_left", 0)], SMALL.shape.camera_sizes())
    meta, stats = sim_demos.demo_meta(demos, SMALL.shape.camera_sizes())
    bundle = seeded_policy_bundle(policy_spec(str(out), "cpu"), meta, 0, stats=fedstats.to_lerobot_stats(stats))
    names = trainable_names(bundle.policy)
    assert names and all(".vlm." not in n for n in names) and any("lm_expert" in n for n in names)
    before = {k: v.clone() for k, v in bundle.policy.state_dict().items()}
    vlm = [k for k in before if ".vlm." in k]
    assert vlm and all(torch.equal(before[k], saved[k]) for k in vlm)  # the pretrained VLM, not a fresh one
    LocalTrainer(bundle.policy, bundle.preprocessor, sim_demos.DemoData(demos, bundle.policy.config.chunk_size),
                 TrainerConfig(batch_size=4)).train(None, 2)
    after = bundle.policy.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in vlm)
    assert any(not torch.equal(after[k], before[k]) for k in names)


def test_a_cached_base_is_current_only_while_the_preset_it_was_built_with_is(built, monkeypatch):
    out, _ = built
    assert sim_base.is_built(out) and not sim_base.is_current(out)  # built with SMALL, not today's preset
    monkeypatch.setitem(sim_base.PRESETS, "sim-base", SMALL)
    assert sim_base.is_current(out)
    assert not sim_base.is_current(out.parent / "nothing-here")


@pytest.mark.parametrize("knobs", [{"vision_steps": -1}, {"vision_batch_size": 0}])
def test_a_recipe_with_a_negative_vision_stage_is_refused(knobs):
    with pytest.raises(ValueError, match="vision_steps must be >= 0 and vision_batch_size >= 1"):
        sim_base.with_knobs(sim_base.PRESETS["sim-base"], **knobs)
