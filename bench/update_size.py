"""Bytes per federated update, per codec, for the tiny stand-in and full-size SmolVLA; JSON on stdout.

Full size is computed from tensor shapes only: SmolVLA with the SmolVLM2-500M-Video-Instruct architecture is
instantiated on torch's 'meta' device (no weights, no downloads). The reference is what the zk0 research
prototype (ivelin/zk0) sends per client per direction each round: the full fp32 state dict, frozen VLM
included (~450 M parameters, ~1.8 GB). Target: <= 1/16 of that.

`measure(eval_loss_by_codec=...)` is the hook for the federation benchmark: given a function that runs a
short federated run with a codec and returns the final server eval loss, it adds that loss to each codec's row.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROTOTYPE_BYTES_PER_ROUND = 1.8e9  # ivelin/zk0: full fp32 state dict per client per direction
TARGET_FRACTION = 1 / 16


def _smolvla(vlm_shape: Any, on_meta: bool) -> Any:
    """SmolVLA for an SO-101 (6-dof state/action, two cameras) around a randomly initialised SmolVLM."""
    import tempfile
    from pathlib import Path

    import torch
    from lerobot.configs import FeatureType, PolicyFeature
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    from zk0.learn.tiny_vlm import is_vlm_dir, write_tiny_vlm

    vlm_dir = Path(tempfile.gettempdir()) / f"zk0-vlm-{vlm_shape.fingerprint()}"
    if not is_vlm_dir(vlm_dir):
        write_tiny_vlm(vlm_dir, vlm_shape)
    side = vlm_shape.image_size
    config = SmolVLAConfig(
        vlm_model_name=str(vlm_dir),
        load_vlm_weights=False,
        device="cpu",
        push_to_hub=False,
        resize_imgs_with_padding=(side, side),
        input_features={
            "observation.state": PolicyFeature(FeatureType.STATE, (6,)),
            "observation.images.front": PolicyFeature(FeatureType.VISUAL, (3, side, side)),
            "observation.images.wrist": PolicyFeature(FeatureType.VISUAL, (3, side, side)),
        },
        output_features={"action": PolicyFeature(FeatureType.ACTION, (6,))},
    )
    # lerobot prints progress to stdout; keep stdout for the JSON result alone.
    with contextlib.redirect_stdout(sys.stderr), torch.device("meta" if on_meta else "cpu"):
        return SmolVLAPolicy(config)


def _model_row(name: str, policy: Any) -> dict[str, Any]:
    from zk0.learn.codec import report

    trainable = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    summary = report(trainable)
    total = sum(p.numel() for p in policy.parameters())
    full_state_fp32 = 4 * sum(t.numel() for t in policy.state_dict().values())
    return {
        "model": name,
        "parameters_total": total,
        "parameters_trainable": summary["parameters"],
        "trainable_tensors": summary["tensor_count"],
        "full_state_dict_fp32_bytes": full_state_fp32,
        "bytes_per_update": summary["bytes"],
        "fraction_of_prototype": {c: b / PROTOTYPE_BYTES_PER_ROUND for c, b in summary["bytes"].items()},
        "fraction_of_own_full_state_dict": {c: b / full_state_fp32 for c, b in summary["bytes"].items()},
    }


def measure(eval_loss_by_codec: Callable[[str], float] | None = None) -> dict[str, Any]:
    """Bytes per update per codec (tiny and full size); with the hook, each codec's final server eval loss."""
    from zk0.learn.codec import CODECS
    from zk0.learn.tiny_vlm import SMOLVLM2_500M, VLMShape

    tiny = _model_row("tiny", _smolvla(VLMShape(), on_meta=False))
    full = _model_row("smolvla-smolvlm2-500m (shapes only)", _smolvla(SMOLVLM2_500M, on_meta=True))
    target = PROTOTYPE_BYTES_PER_ROUND * TARGET_FRACTION
    result: dict[str, Any] = {
        "prototype_bytes_per_client_per_direction": PROTOTYPE_BYTES_PER_ROUND,
        "target_bytes": target,
        "models": [tiny, full],
        "full_size_meets_target": {c: b <= target for c, b in full["bytes_per_update"].items()},
    }
    if eval_loss_by_codec is not None:
        result["server_eval_loss"] = {codec: eval_loss_by_codec(codec) for codec in CODECS}
    return result


if __name__ == "__main__":
    print(json.dumps(measure()))
