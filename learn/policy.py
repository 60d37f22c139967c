"""SmolVLA policy factory: the real pretrained model, the tiny offline stand-in, and full-size random init.

All three build the policy the way `lerobot-train` does (lerobot's `make_policy` + `make_pre_post_processors`
with the dataset's features and normalization statistics), so the VLM is frozen and only the action expert
and projections train (`freeze_vision_encoder`, `train_expert_only`). The federation exchanges only those
trainable tensors: `trainable_state` / `load_trainable_state`.

VLMs built from scratch (tiny, full-random, a local SmolVLM directory) are named by a path in `vlm_store()`:
config.json's `vlm_model_name` and the tokenizer step's `tokenizer_name` are resolved by transformers as a hub
id or a path (absolute, or relative to the working directory), never relative to the checkpoint that names
them, so they must name a directory that outlives the process. Checkpoints also carry a copy in `vlm/`, from
which `resolve_checkpoint_vlm` restores the store entry on a host that lacks it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from zk0.learn.tiny_vlm import SMOLVLM2_500M, VLMShape, is_vlm_dir, write_tiny_vlm

BASE_MODEL = "lerobot/smolvla_base"
TINY = "tiny"
FULL_RANDOM = "full-random"
VLM_DIR = "vlm"  # a checkpoint's copy of its VLM directory (see zk0.learn.checkpoint)


@dataclass
class PolicySpec:
    """Which SmolVLA to build.

    model: "base" (lerobot/smolvla_base, the default users run), a hub id or local path of a pretrained SmolVLA
    checkpoint, "tiny" (random tiny SmolVLM, offline), "full-random" (SmolVLM2-500M shape, random weights), or a
    directory holding a SmolVLM config + tokenizer (e.g. written by `zk0 model tiny`), used as the VLM of a
    freshly initialised SmolVLA.
    """

    model: str = "base"
    device: str = "cpu"
    chunk_size: int = 50
    n_action_steps: int = 50
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class PolicyBundle:
    policy: Any  # SmolVLAPolicy
    preprocessor: Any  # PolicyProcessorPipeline
    postprocessor: Any


def vlm_store() -> Path:
    """Where zk0 keeps the weightless VLM directories its policies name: $XDG_CACHE_HOME/zk0/vlm (~/.cache).

    Entries are content-addressed, so a VLM has the same path on every host whose store is at the same place.
    """
    from zk0.common.cache import zk0_cache

    return zk0_cache() / "vlm"


def vlm_files(source: Path) -> list[Path]:
    """The files of a weightless VLM directory: model config, tokenizer, processor, chat template."""
    return sorted(p for p in source.iterdir() if p.is_file() and p.suffix in (".json", ".jinja", ".txt"))


def stable_vlm_dir(source: str | Path) -> Path:
    """The copy of the VLM directory `source` in `vlm_store()`, named by a digest of its files; made if missing."""
    files = vlm_files(Path(source))
    digest = hashlib.sha256()
    for path in files:
        data = path.read_bytes()
        digest.update(f"{path.name}:{len(data)}\n".encode())
        digest.update(data)
    target = vlm_store() / digest.hexdigest()[:16]
    if is_vlm_dir(target):
        return target
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for path in files:
        shutil.copy2(path, tmp / path.name)
    try:
        os.replace(tmp, target)
    except OSError:  # another process made it first: its copy has the same content
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_checkpoint_vlm(checkpoint: Path, config: Any) -> dict[str, Any]:
    """Point `config` at the checkpoint's own VLM copy when the VLM it names is not on this host.

    Returns the pre-processor overrides that make the tokenizer step follow (none when nothing changed).
    """
    if Path(config.vlm_model_name).exists() or not is_vlm_dir(checkpoint / VLM_DIR):
        return {}
    config.vlm_model_name = str(stable_vlm_dir(checkpoint / VLM_DIR))
    return {"tokenizer_processor": {"tokenizer_name": config.vlm_model_name}}


def _vlm_dir_for(model: str) -> tuple[str, dict[str, Any]] | None:
    """(VLM directory in the store, config overrides) for models built from scratch; None for pretrained ones."""
    if model in (TINY, FULL_RANDOM):
        shape = VLMShape() if model == TINY else SMOLVLM2_500M
        with tempfile.TemporaryDirectory(prefix="zk0-vlm-build-") as scratch:
            vlm = stable_vlm_dir(write_tiny_vlm(scratch, shape))  # deterministic: the same entry every time
        return str(vlm), {"resize_imgs_with_padding": (shape.image_size, shape.image_size)}
    if is_vlm_dir(model) and not (Path(model) / "model.safetensors").is_file():
        image_size = json.loads((Path(model) / "config.json").read_text())["vision_config"]["image_size"]
        return str(stable_vlm_dir(model)), {"resize_imgs_with_padding": (image_size, image_size)}
    return None


def make_policy_bundle(spec: PolicySpec, ds_meta: Any, stats: Mapping[str, Mapping[str, Any]] | None = None) -> PolicyBundle:
    """Build policy + processors for a dataset's features, normalizing with `stats` (default: the dataset's)."""
    from lerobot.configs import PreTrainedConfig
    from lerobot.policies import make_policy, make_pre_post_processors
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig

    stats = dict(stats if stats is not None else ds_meta.stats)
    model = BASE_MODEL if spec.model == "base" else spec.model
    scratch = _vlm_dir_for(model)
    common = {"device": spec.device, "chunk_size": spec.chunk_size, "n_action_steps": spec.n_action_steps,
              "push_to_hub": False, **spec.overrides}
    if scratch is not None:
        vlm_dir, shape_overrides = scratch
        cfg = SmolVLAConfig(vlm_model_name=vlm_dir, load_vlm_weights=False, **{**shape_overrides, **common})
        policy = make_policy(cfg, ds_meta=ds_meta)
        pre, post = make_pre_post_processors(cfg, dataset_stats=stats)
    else:
        cfg = PreTrainedConfig.from_pretrained(model, cli_overrides=[])
        for key, value in common.items():
            setattr(cfg, key, value)
        cfg.pretrained_path = model
        cfg.input_features, cfg.output_features = {}, {}
        vlm_overrides = resolve_checkpoint_vlm(Path(model), cfg)
        policy = make_policy(cfg, ds_meta=ds_meta)
        features = {**policy.config.input_features, **policy.config.output_features}
        pre, post = make_pre_post_processors(
            cfg,
            pretrained_path=model,
            preprocessor_overrides={
                **vlm_overrides,
                "device_processor": {"device": spec.device},
                "normalizer_processor": {"stats": stats, "features": features,
                                         "norm_map": policy.config.normalization_mapping},
            },
            postprocessor_overrides={
                "unnormalizer_processor": {"stats": stats, "features": policy.config.output_features,
                                           "norm_map": policy.config.normalization_mapping},
            },
        )
    return PolicyBundle(policy, pre, post)


def seeded_policy_bundle(spec: PolicySpec, ds_meta: Any, seed: int,
                         stats: Mapping[str, Mapping[str, Any]] | None = None) -> PolicyBundle:
    """`make_policy_bundle` with every randomly initialised weight fixed by `seed`.

    The same seed must give the same model: federation peers check that their frozen weights match, and two
    `zk0 train --seed` runs must start from the same point. The caller's RNG stream is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make_policy_bundle(spec, ds_meta, stats)


def trainable_names(policy: torch.nn.Module) -> list[str]:
    return [name for name, p in policy.named_parameters() if p.requires_grad]


def trainable_parameters(policy: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in policy.parameters() if p.requires_grad]


def trainable_state(policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the trainable tensors (what a federated update carries), by parameter name."""
    return {name: p.detach().to("cpu", copy=True) for name, p in policy.named_parameters() if p.requires_grad}


def load_trainable_state(policy: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy `tensors` into the policy's trainable parameters; all of them, exactly, or nothing."""
    params = {name: p for name, p in policy.named_parameters() if p.requires_grad}
    missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or extra:
        raise ValueError(f"trainable state mismatch: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, p in params.items():
        if tuple(tensors[name].shape) != tuple(p.shape):
            raise ValueError(f"trainable state {name}: shape {tuple(tensors[name].shape)} != {tuple(p.shape)}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name].to(device=p.device, dtype=p.dtype))
