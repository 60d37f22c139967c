"""Torch vs onnxruntime on the same inputs and noise: how far an export's actions are from the checkpoint's.

Each trial builds one raw observation (seeded: state inside the dataset's range, random camera images, a task
instruction), runs it through lerobot's pre-processor once, and gives that same batch and the same noise to
`SmolVLAPolicy.predict_action_chunk` (with the export's step count) and to `OnnxPolicy.predict_action_chunk`.
The difference is reported on the policy's output (normalized actions, what the graphs compute; the manifest's
tolerance applies here) and after lerobot's post-processor (joint units, what the arm is sent).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

TASK = "pick the red cube and place it in the bin"


@dataclass
class Parity:
    trials: int
    steps: int
    quantize: str
    max_abs_normalized: float
    max_abs_unnormalized: float
    tolerance: float | None
    passed: bool | None  # None: a quantized export has no max-abs tolerance (judge it by success)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def raw_observation(config: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A frame as lerobot's `build_dataset_frame` gives it: state float32, images HxWx3 uint8."""
    from lerobot.utils.constants import OBS_STATE

    frame = {OBS_STATE: rng.uniform(-60.0, 60.0, config.input_features[OBS_STATE].shape).astype(np.float32)}
    for key, feature in config.image_features.items():
        channels, height, width = feature.shape
        frame[key] = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return frame


def measure(torch_bundle: Any, onnx_bundle: Any, trials: int = 3, seed: int = 0,
            robot_type: str = "so101_follower") -> Parity:
    from lerobot.policies.utils import prepare_observation_for_inference

    policy, exported = torch_bundle.policy.eval(), onnx_bundle.policy
    manifest = exported.manifest
    policy.config.num_steps = manifest.steps  # compare the export, not a step count change
    rng, generator = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    normalized = unnormalized = 0.0
    for _ in range(trials):
        frame = raw_observation(policy.config, rng)
        noise = torch.randn((1, manifest.chunk_size, manifest.max_action_dim), generator=generator)
        with torch.inference_mode():
            batch = torch_bundle.preprocessor(prepare_observation_for_inference(dict(frame), torch.device("cpu"),
                                                                                TASK, robot_type))
            expected = policy.predict_action_chunk(dict(batch), noise=noise.clone())
            actual = exported.predict_action_chunk(dict(batch), noise=noise.clone())
            normalized = max(normalized, float((expected - actual).abs().max()))
            unnormalized = max(unnormalized, float((torch_bundle.postprocessor(expected)
                                                    - onnx_bundle.postprocessor(actual)).abs().max()))
    tolerance = manifest.tolerance
    return Parity(trials, manifest.steps, manifest.quantize, normalized, unnormalized, tolerance,
                  None if tolerance is None else normalized <= tolerance)


def parity(checkpoint: str | Path, export_dir: str | Path, trials: int = 3, seed: int = 0) -> Parity:
    """Load both backends and `measure`; refuses an export made from other weights."""
    from zk0.learn.checkpoint import load_checkpoint, read_meta
    from zk0.learn.onnx_export import read_manifest
    from zk0.learn.onnx_runtime import load_onnx_bundle

    source, sha = read_manifest(export_dir).source_sha256, read_meta(checkpoint).sha256
    if source != sha:
        raise ValueError(f"{export_dir} was exported from weights {source[:12]}, not {checkpoint}'s {sha[:12]}")
    torch_bundle, _ = load_checkpoint(checkpoint)  # refuses weights that do not match their recorded SHA-256
    return measure(torch_bundle, load_onnx_bundle(export_dir), trials, seed)
