"""`zk0 model sim-base`: the simulated world's counterpart of lerobot/smolvla_base.

Real hosts start from a SmolVLA whose VLM (vision tower included) and action expert were pretrained on a broad
dataset, and fine-tune only the action expert. The simulated world gets the same shape: a SmolVLA with a small
SmolVLM stand-in (`SimBaseShape`), every part of it (vision tower, connector, text layers, action expert)
trained centrally on scripted demonstrations of every simulated task (`SimBaseRecipe`), then saved with the
VLM frozen (`freeze_vision_encoder`, `train_expert_only`), so `zk0 train --model BASE`, the federation and
`zk0 validate` treat it exactly as they treat smolvla_base. Besides the flow-matching loss, the vision tower
learns from a scene probe (`SimBaseRecipe.scene_loss_weight`): a linear map, discarded afterwards, from every
camera's image tokens to where the cubes and the bin are, the sim's stand-in for SmolVLM's own pretraining. An
optional first stage (`vision_steps`, zk0.learn.vision_pretrain) trains the tower alone on freshly rendered scenes.

Demonstrations (zk0.learn.sim_demos) are recorded in lock-step (the loop `zk0 validate --sim` judges in, safety
envelope included), with the cameras rendered at the size hosts record (`SimBaseShape.cameras`) and kept at
that size: SmolVLA pads them to its square input itself, as it does for recorded frames. Scene seeds start
at `SIM_BASE_SEED_BASE`, disjoint from recording (`zk0 record` keeps to [0, 1_000_000)), validation
(1_000_000 + i) and the discrimination bench (2_000_000 + i).

Pure decisions (shape, recipe, seeds, config overrides) are separate from the I/O (`record_demos`,
`build_sim_base`). `--seed` fixes the initial weights and the training order; the scenes are the preset's.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from zk0.learn.sim_demos import SCENE_DIMS, Demo, DemoData, demo_meta, record_demos
from zk0.learn.tiny_vlm import VLMShape
from zk0.learn.vision_pretrain import SceneRenderer, pretrain_vision

SIM_BASE_SEED_BASE = 3_000_000
TASK_SEED_STRIDE = 100_000  # scene seeds of task k: SIM_BASE_SEED_BASE + k * stride + i


def cache_dir(seed: int, env: Mapping[str, str] = os.environ) -> Path:
    """Where `zk0 demo` and `zk0 experiment` keep the sim base built from `seed`
    ($XDG_CACHE_HOME/zk0/sim-base/seed-<seed>, default ~/.cache/...)."""
    from zk0.common.cache import zk0_cache

    return zk0_cache(env) / "sim-base" / f"seed-{seed}"


def is_built(path: Path) -> bool:
    """Whether `path` holds a saved policy (what `zk0 model sim-base` writes last)."""
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def is_current(path: Path) -> bool:
    """Whether `path` holds a sim base built with today's preset: a cache built by an older zk0, whose preset
    has changed since, is stale and gets rebuilt rather than judged as if it were today's base."""
    import json

    from zk0.learn.checkpoint import read_meta

    if not is_built(path):
        return False
    try:
        preset = read_meta(path).extra.get("preset")
    except (OSError, ValueError, TypeError):  # unreadable or foreign metadata: not a base this zk0 built
        return False
    return preset == json.loads(json.dumps(describe(PRESETS["sim-base"])))


@dataclass(frozen=True)
class SimBaseShape:
    """The policy: its SmolVLM stand-in, action chunking and the cameras (name, width, height) it sees."""

    # The action expert is 0.75 x text_hidden wide (SmolVLA's expert_width_multiplier): 128 gives it 96, which
    # reached 28 % on the hosts' tasks where 64 (a 48-wide expert) reached 19 % (NOTES "Sim base").
    vlm: VLMShape = VLMShape(image_size=128, patch_size=16, scale_factor=2, vision_hidden=64,
                             vision_intermediate=128, vision_layers=2, vision_heads=2, text_hidden=128,
                             text_intermediate=256, text_layers=2, text_heads=8, text_kv_heads=4, head_dim=16)
    chunk_size: int = 50  # = the federation's chunk for models given by path (zk0.learn.federation.policy_spec)
    n_action_steps: int = 50
    cameras: tuple[tuple[str, int, int], ...] = (("front", 128, 96), ("wrist", 128, 96))

    def camera_sizes(self) -> dict[str, tuple[int, int]]:
        return {name: (width, height) for name, width, height in self.cameras}


@dataclass(frozen=True)
class SimBaseRecipe:
    """How the base is trained: which demonstrations, how many steps, at what learning rate."""

    shape: SimBaseShape = SimBaseShape()
    tasks: tuple[str, ...] = ()  # () = every simulated task
    demos_per_task: int = 30
    # Images are kept every `image_stride` ticks (state and action every tick): neighbouring frames of a
    # demonstration are nearly the same picture, and a policy generalises over scenes, not ticks. Held in
    # memory, images are what limits how many scenes a build can use.
    image_stride: int = 1
    steps: int = 6000
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 200
    decay_lr: float = 2.5e-5
    finetune_lr: float = 3e-4  # the peak LR the saved config gives hosts that fine-tune with SmolVLA's schedule
    # Weight of the vision tower's auxiliary loss: from every camera's image tokens together (a wrist camera alone
    # rarely sees every cube), a linear probe (discarded after pretraining) regresses where the cubes and the bin
    # are. Localising objects is what hosts need from a frozen VLM, and the flow-matching loss alone teaches it
    # slowly. 0 = flow matching only.
    scene_loss_weight: float = 1.0
    # Stage one (zk0.learn.vision_pretrain): the vision tower and connector alone learn where things are on
    # freshly rendered scenes for `vision_steps` steps; the policy then trains with the tower frozen, so it
    # cannot memorise the demonstrations' placements through it. 0 = no stage one, everything trains together.
    vision_steps: int = 0
    vision_batch_size: int = 32
    vision_lr: float = 1e-3
    max_episode_s: float = 20.0
    seed_base: int = SIM_BASE_SEED_BASE

    def __post_init__(self) -> None:
        if self.vision_steps < 0 or self.vision_batch_size < 1:
            raise ValueError("vision_steps must be >= 0 and vision_batch_size >= 1")


PRESETS: dict[str, SimBaseRecipe] = {"sim-base": SimBaseRecipe()}


def task_names(recipe: SimBaseRecipe) -> list[str]:
    from zk0.hw.sim.tasks import TASKS

    return list(recipe.tasks or TASKS)


def demo_plan(recipe: SimBaseRecipe) -> list[tuple[str, int]]:
    """(task, scene seed) of every pretraining demonstration; task k uses seeds from seed_base + k * stride."""
    from zk0.hw.sim.tasks import TASKS

    if recipe.demos_per_task > TASK_SEED_STRIDE:
        raise ValueError(f"at most {TASK_SEED_STRIDE} demonstrations per task")
    index = {name: k for k, name in enumerate(TASKS)}
    return [(task, recipe.seed_base + index[task] * TASK_SEED_STRIDE + i)
            for task in task_names(recipe) for i in range(recipe.demos_per_task)]


def pretrain_overrides(recipe: SimBaseRecipe) -> dict[str, Any]:
    """SmolVLA config while pretraining: every part trains, with the recipe's LR schedule."""
    return {"freeze_vision_encoder": False, "train_expert_only": False, "optimizer_lr": recipe.lr,
            "scheduler_warmup_steps": recipe.warmup_steps, "scheduler_decay_steps": recipe.steps,
            "scheduler_decay_lr": recipe.decay_lr}


def release_overrides(recipe: SimBaseRecipe) -> dict[str, Any]:
    """SmolVLA config of the saved base: the VLM frozen as in smolvla_base, and a fine-tuning LR schedule."""
    return {"freeze_vision_encoder": True, "train_expert_only": True, "optimizer_lr": recipe.finetune_lr,
            "scheduler_warmup_steps": 100, "scheduler_decay_lr": recipe.finetune_lr / 40}


def _quiet():
    """lerobot prints while building a policy; stdout may be a JSON report."""
    return contextlib.redirect_stdout(sys.stderr)


def new_policy(shape: SimBaseShape, meta: SimpleNamespace, seed: int, overrides: dict[str, Any]) -> Any:
    """A freshly initialised SmolVLA of `shape` (weights fixed by `seed`) for the demonstrations' features."""
    import tempfile

    from zk0.learn.policy import PolicySpec, seeded_policy_bundle, stable_vlm_dir
    from zk0.learn.tiny_vlm import write_tiny_vlm

    with tempfile.TemporaryDirectory(prefix="zk0-sim-base-vlm-") as scratch, _quiet():
        vlm = stable_vlm_dir(write_tiny_vlm(scratch, shape.vlm))
        spec = PolicySpec(model=str(vlm), chunk_size=shape.chunk_size, n_action_steps=shape.n_action_steps,
                          overrides=overrides)
        return seeded_policy_bundle(spec, meta, seed)


def freeze_vlm(bundle: Any, overrides: dict[str, Any]) -> None:
    """Apply the release config: the VLM stops training, as in smolvla_base (only the expert trains on)."""
    for key, value in overrides.items():
        setattr(bundle.policy.config, key, value)
    model = bundle.policy.model.vlm_with_expert
    model.freeze_vision_encoder = bundle.policy.config.freeze_vision_encoder
    model.train_expert_only = bundle.policy.config.train_expert_only
    model.set_requires_grad()


@dataclass
class BuildReport:
    """What a build did, for the command's output and the bench."""

    demos: int
    successful_demos: int
    frames: int
    record_s: float
    train_s: float
    losses: list[float] = field(default_factory=list)
    scene_losses: list[float] = field(default_factory=list)
    parameters: int = 0
    trainable_after: int = 0
    sha256: str = ""


def _pretrain(bundle: Any, data: DemoData, recipe: SimBaseRecipe, seed: int,
              progress: Callable[[], bool]) -> tuple[list[float], list[float]]:
    """(flow-matching losses, scene-probe losses) per step of training every trainable part of the policy.

    The step is lerobot's SmolVLA step as zk0.learn.trainer runs it (its AdamW and LR presets, gradient
    clipping), plus the scene probe's loss when `recipe.scene_loss_weight` is set; the probe reads the image
    tokens the VLM's connector hands the text layers, one linear map over every camera's tokens together.
    """
    import torch
    import torch.nn.functional as F

    from zk0.learn.trainer import SampleStream

    policy, config = bundle.policy, bundle.policy.config
    tokens, width = recipe.shape.vlm.image_seq_len, recipe.shape.vlm.text_hidden
    probe = torch.nn.Linear(len(config.image_features) * tokens * width, SCENE_DIMS)
    params = [p for p in policy.parameters() if p.requires_grad] + list(probe.parameters())
    optimizer = config.get_optimizer_preset().build(params)
    scheduler = config.get_scheduler_preset().build(optimizer, recipe.steps)
    captured: list[Any] = []
    hook = policy.model.vlm_with_expert.get_vlm_model().connector.register_forward_hook(
        lambda _module, _inputs, output: captured.append(output))
    stream = SampleStream(data.frame_index(), seed)
    losses, scene_losses = [], []
    policy.train()
    try:
        for _ in range(recipe.steps):
            if progress():
                break
            samples = stream.take(recipe.batch_size)
            captured.clear()
            loss, _ = policy.forward(bundle.preprocessor(data.batch(samples)))
            target = data.scene_targets(samples)
            scene = F.mse_loss(probe(torch.cat([t.flatten(1) for t in captured], 1)), target)
            (loss + recipe.scene_loss_weight * scene).backward()
            torch.nn.utils.clip_grad_norm_(params, config.optimizer_grad_clip_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            losses.append(float(loss.detach()))
            scene_losses.append(float(scene.detach()))
    finally:
        hook.remove()
    return losses, scene_losses


def train_base(recipe: SimBaseRecipe, demos: Sequence[Demo], seed: int,
               progress: Callable[[], bool] | None = None) -> tuple[Any, Any, list[float], list[float], float]:
    """(bundle with the VLM frozen again, statistics, flow-matching and scene-probe losses per step, seconds)
    of pretraining on `demos`; `seed` fixes the initial weights, the sample order and the noise."""
    import torch

    meta, stats = demo_meta(demos, recipe.shape.camera_sizes())
    bundle = new_policy(recipe.shape, meta, seed, pretrain_overrides(recipe))
    started = time.perf_counter()
    progress = progress or (lambda: False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if recipe.vision_steps:
            scenes = SceneRenderer(recipe.shape.camera_sizes(), np.concatenate([d.state for d in demos]),
                                   task_names(recipe), seed)
            pretrain_vision(bundle.policy, scenes, recipe.vision_steps, recipe.vision_batch_size, recipe.vision_lr,
                            progress)
            freeze_vlm(bundle, {"freeze_vision_encoder": True})
        losses, scene_losses = _pretrain(bundle, DemoData(demos, recipe.shape.chunk_size), recipe, seed, progress)
    freeze_vlm(bundle, release_overrides(recipe))
    bundle.policy.eval()
    return bundle, stats, losses, scene_losses, time.perf_counter() - started


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_sim_base(out: str | Path, recipe: SimBaseRecipe, seed: int = 0,
                   progress: Callable[[], bool] | None = None, log: Callable[[str], None] = lambda _: None,
                   demos: Sequence[Demo] | None = None) -> BuildReport:
    """Record the recipe's demonstrations (unless given: those of `demo_plan(recipe)`, recorded earlier),
    pretrain on them and save the base checkpoint at `out`."""
    from zk0.learn.checkpoint import CheckpointMeta, save_checkpoint

    started = time.perf_counter()
    if demos is None:
        plan = demo_plan(recipe)
        log(f"recording {len(plan)} scripted demonstrations ({len(task_names(recipe))} tasks)")

        def recorded(done: int, total: int) -> None:
            if done % 100 == 0 or done == total:
                log(f"recorded {done}/{total}, {time.perf_counter() - started:.0f} s")

        demos = record_demos(plan, recipe.shape.camera_sizes(), recipe.max_episode_s, recipe.image_stride, recorded)
    record_s = time.perf_counter() - started
    good = [d for d in demos if d.success]
    log(f"{len(good)}/{len(demos)} successful, {sum(len(d.state) for d in good)} frames, {record_s:.0f} s; "
        f"pretraining {recipe.steps} steps")
    with one_torch_thread():  # the seed fixes the weights only if the float sums run in one order
        bundle, stats, losses, scene_losses, train_s = train_base(recipe, good, seed, progress)
    meta = save_checkpoint(out, bundle, CheckpointMeta(run="sim-base", round=0, extra={
        "preset": describe(recipe), "seed": seed}), stats=stats)
    return BuildReport(demos=len(demos), successful_demos=len(good), frames=sum(len(d.state) for d in good),
                       record_s=record_s, train_s=train_s, losses=losses, scene_losses=scene_losses,
                       parameters=sum(p.numel() for p in bundle.policy.parameters()),
                       trainable_after=sum(p.numel() for p in bundle.policy.parameters() if p.requires_grad),
                       sha256=meta.sha256)


def describe(recipe: SimBaseRecipe) -> dict[str, Any]:
    """The recipe as plain JSON (recorded in the checkpoint's zk0.json and the bench's output)."""
    from dataclasses import asdict

    return asdict(recipe)


def with_knobs(recipe: SimBaseRecipe, **knobs: Any) -> SimBaseRecipe:
    """The recipe with recipe- or shape-level fields replaced (the bench's search knobs)."""
    shape_fields = {k: v for k, v in knobs.items() if k in SimBaseShape.__dataclass_fields__}
    vlm_fields = {k: v for k, v in knobs.items() if k in VLMShape.__dataclass_fields__}
    rest = {k: v for k, v in knobs.items() if k not in shape_fields and k not in vlm_fields}
    shape = replace(recipe.shape, vlm=replace(recipe.shape.vlm, **vlm_fields), **shape_fields)
    return replace(recipe, shape=shape, **rest)
