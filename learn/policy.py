"""SmolVLA policy factory: the real pretrained model, the tiny offline stand-in, and full-size random init.

All three build the policy the way `lerobot-train` does (lerobot's `make_policy` + `make_pre_post_processors`
with the dataset's features and normalization statistics), so the VLM is frozen and only the action expert
and projections train (`freeze_vision_encoder`, `train_expert_only`). The federation exchanges only those
trainable tensors: `trainable_state` / `load_trainable_state`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

BASE_MODEL = "lerobot/smolvla_base"
TINY = "tiny"
FULL_RANDOM = "full-random"


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


def _vlm_dir_for(model: str) -> tuple[str, dict[str, Any]] | None:
    """(VLM directory, config overrides) for models built from scratch; None for pretrained checkpoints."""
    from zk0.learn.tiny_vlm import SMOLVLM2_500M, VLMShape, is_vlm_dir, write_tiny_vlm

    if model in (TINY, FULL_RANDOM):
        shape = VLMShape() if model == TINY else SMOLVLM2_500M
        cache = Path(tempfile.gettempdir()) / f"zk0-vlm-{model}-{shape.fingerprint()}"
        if not is_vlm_dir(cache):
            write_tiny_vlm(cache, shape)
        return str(cache), {"resize_imgs_with_padding": (shape.image_size, shape.image_size)}
    if is_vlm_dir(model) and not (Path(model) / "model.safetensors").is_file():
        import json

        image_size = json.loads((Path(model) / "config.json").read_text())["vision_config"]["image_size"]
        return model, {"resize_imgs_with_padding": (image_size, image_size)}
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
        policy = make_policy(cfg, ds_meta=ds_meta)
        features = {**policy.config.input_features, **policy.config.output_features}
        pre, post = make_pre_post_processors(
            cfg,
            pretrained_path=model,
            preprocessor_overrides={
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
