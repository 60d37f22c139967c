"""Export a SmolVLA checkpoint's action-chunk inference to ONNX graphs that onnxruntime runs.

lerobot's `VLAFlowMatching.sample_actions` is split where it splits itself:

- prefix.onnx: camera images (the policy's own sizes, [0, 1]), language tokens + mask (padded to the
  tokenizer's max length), state -> the prefix pad mask and the VLM's key/value cache, stacked per layer
  ([layers, batch, kv heads, prefix length, head dim]). Runs once per chunk.
- denoise.onnx: x_t, timestep, the prefix mask and cache -> the velocity v_t. Runs once per Euler step; the
  Euler loop (`x += dt * v`) stays in Python (zk0.learn.onnx_runtime), so the step count is a runtime choice.

Both graphs trace lerobot's own code (`prepare_images`, `embed_prefix`, `SmolVLMWithExpertModel.forward`,
`denoise_step`); the only glue is the cache. lerobot 0.6.1 keeps the prefix K/V in transformers' in-place
`DynamicCache`, which cannot cross a graph boundary, so the prefix graph returns the cache's tensors and the
denoise graph wraps its inputs in a fresh `DynamicCache`; `denoise_step` appends and crops it as usual, and
torch.export sees that as ordinary tensor ops. The legacy TorchScript exporter fails inside transformers'
mask utilities, so the dynamo exporter (`torch.onnx.export(dynamo=True)`, needs onnxscript) is used.

Shapes are fixed (batch 1, the checkpoint's cameras and image sizes, `tokenizer_max_length` tokens): a robot
host runs exactly one observation layout. The flow-matching noise is an input of the runtime, never drawn in
a graph. lerobot's pre/post processors (normalization, tokenizer) stay in Python and are copied alongside.
int8 is onnxruntime's dynamic quantization (`quant_pre_process`, then `quantize_dynamic`: int8 weights of
MatMul/Gemm/Conv per output channel, activations quantized per call).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

MANIFEST = "manifest.json"
PREFIX_GRAPH = "prefix.onnx"
DENOISE_GRAPH = "denoise.onnx"
FORMAT = 1
# Bumped when the exporter makes different (better) graphs of the same interface: older exports stay loadable,
# but the export cache makes a new one. 2: plain attention, no vision mask (`export_attention`). 3: opset 20,
# concatenated RoPE.
EXPORTER_REVISION = 3
# Opset 20 has a Gelu operator: the vision tower's tanh-GELU exports as one node rather than Pow/Tanh/Mul/Add
# (at full size, the prefix graph ~45 ms faster on 2 cores).
DEFAULT_OPSET = 20
FP32_TOLERANCE = 1e-4  # max abs difference of the policy's (normalized) actions, torch vs onnxruntime
QUANTIZE = ("none", "int8")


@dataclass(frozen=True)
class ExportOptions:
    steps: int | None = None  # Euler steps the runtime takes; None: the checkpoint's num_steps
    quantize: str = "none"  # "none" or "int8"
    opset: int = DEFAULT_OPSET

    def __post_init__(self) -> None:
        if self.quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {QUANTIZE}, not {self.quantize!r}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, not {self.steps}")

    def key(self) -> str:
        """How a cached export names these options."""
        return f"steps{self.steps or 'cfg'}-{self.quantize}-opset{self.opset}-r{EXPORTER_REVISION}"


@dataclass
class Manifest:
    source_sha256: str  # of the checkpoint's model.safetensors (lerobot's `save_pretrained` weights)
    opset: int
    steps: int
    quantize: str
    cameras: dict[str, list[int]]  # image feature -> [C, H, W] the prefix graph takes, in this order
    state_dim: int
    lang_len: int
    chunk_size: int
    max_action_dim: int
    action_dim: int
    prefix_len: int
    kv_shape: list[int]
    tolerance: float | None  # max abs of normalized actions vs torch; None: quantized, judged by success
    graphs: dict[str, str] = field(default_factory=lambda: {"prefix": PREFIX_GRAPH, "denoise": DENOISE_GRAPH})
    files: dict[str, str] = field(default_factory=dict)  # file -> SHA-256
    versions: dict[str, str] = field(default_factory=dict)
    format: int = FORMAT


def read_manifest(export_dir: str | Path) -> Manifest:
    data = json.loads((Path(export_dir) / MANIFEST).read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{export_dir}: export format {data.get('format')}, this zk0 reads {FORMAT}")
    return Manifest(**data)


class PrefixGraph(torch.nn.Module):
    """`sample_actions` up to the prefix KV cache, for a fixed camera layout."""

    def __init__(self, policy: Any) -> None:
        super().__init__()
        self.policy = policy
        self.cameras = list(policy.config.image_features)

    def forward(self, state: torch.Tensor, lang_tokens: torch.Tensor, lang_masks: torch.Tensor,
                *images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from lerobot.policies.common.vla_utils import make_att_2d_masks
        from lerobot.utils.constants import OBS_STATE

        batch = {OBS_STATE: state, **dict(zip(self.cameras, images, strict=True))}
        imgs, img_masks = self.policy.prepare_images(batch)
        model = self.policy.model
        embs, pad_masks, att_masks = model.embed_prefix(imgs, img_masks, lang_tokens, lang_masks,
                                                        state=self.policy.prepare_state(batch))
        _, cache = model.vlm_with_expert.forward(
            attention_mask=make_att_2d_masks(pad_masks, att_masks), position_ids=torch.cumsum(pad_masks, dim=1) - 1,
            past_key_values=None, inputs_embeds=[embs, None], use_cache=True)
        return (pad_masks, torch.stack([layer.keys for layer in cache.layers]),
                torch.stack([layer.values for layer in cache.layers]))


class DenoiseGraph(torch.nn.Module):
    """One `denoise_step`, its KV cache given as tensors."""

    def __init__(self, policy: Any) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, x_t: torch.Tensor, timestep: torch.Tensor, prefix_pad_masks: torch.Tensor,
                past_keys: torch.Tensor, past_values: torch.Tensor) -> torch.Tensor:
        from transformers import DynamicCache

        cache = DynamicCache([(past_keys[i], past_values[i]) for i in range(past_keys.shape[0])])
        return self.policy.model.denoise_step(prefix_pad_masks, cache, x_t, timestep)


def example_inputs(config: Any) -> dict[str, torch.Tensor]:
    """Inputs of the prefix graph's shapes and dtypes (their values only steer tracing, never the graph)."""
    from lerobot.utils.constants import OBS_STATE

    length = config.tokenizer_max_length
    inputs = {"state": torch.zeros(1, config.input_features[OBS_STATE].shape[0]),
              "lang_tokens": torch.zeros(1, length, dtype=torch.long),
              "lang_masks": torch.ones(1, length, dtype=torch.bool)}
    for i, feature in enumerate(config.image_features.values()):
        inputs[f"image_{i}"] = torch.full((1, *feature.shape), 0.5)
    return inputs


# How the exported vision tower attends: transformers' eager attention, with no padding mask. lerobot's
# `embed_image` never passes a patch mask (every camera image fills the tower's square input after its own
# resize-with-pad), so the vision tower's mask is always all-true; traced, it would still be built and added to
# every head's 1024 x 1024 scores.
UNMASKED_EAGER = "zk0_unmasked_eager"


def concatenated_rope(x: torch.Tensor, positions: torch.Tensor, max_wavelength: int = 10_000) -> torch.Tensor:
    """lerobot's `apply_rope`, its two halves concatenated rather than written into slices of an empty tensor:
    the same float32 operations, so the same values. Traced, each slice write becomes a ScatterND with a
    transpose on either side; at full size those cost ~5 % of a chunk."""
    d_half = x.shape[-1] // 2
    dtype = x.dtype
    x = x.to(torch.float32)
    freq_exponents = (2.0 / x.shape[-1]) * torch.arange(d_half, dtype=torch.float32, device=x.device)
    timescale = max_wavelength**freq_exponents
    radians = (positions[..., None].to(torch.float32) / timescale[None, None, :])[..., None, :]
    sin, cos = torch.sin(radians), torch.cos(radians)
    x1, x2 = x.split(d_half, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(dtype)


@contextlib.contextmanager
def export_attention(policy: Any) -> Iterator[None]:
    """The VLM's attention as plain MatMul/Softmax/MatMul while tracing, the vision tower's without its
    all-true mask. Traced through torch's SDPA, every softmax is followed by a NaN guard (IsNaN + Where over each
    head's whole score matrix); at full size (1024 patches per camera) the guard and the mask cost ~20 % of the
    prefix graph's time on CPU. The maths is the same, so the export stays within tolerance of torch's SDPA.
    lerobot's RoPE is traced as `concatenated_rope` meanwhile."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.models.smolvlm import modeling_smolvlm

    AttentionInterface.register(UNMASKED_EAGER, modeling_smolvlm.eager_attention_forward)
    AttentionMaskInterface.register(UNMASKED_EAGER, lambda *args, **kwargs: None)
    from lerobot.policies.smolvla import smolvlm_with_expert

    vlm = policy.model.vlm_with_expert.vlm
    before = vlm.config._attn_implementation
    vlm.set_attn_implementation({"": "eager", "text_config": "eager", "vision_config": UNMASKED_EAGER})
    lerobot_rope, smolvlm_with_expert.apply_rope = smolvlm_with_expert.apply_rope, concatenated_rope
    try:
        yield
    finally:
        smolvlm_with_expert.apply_rope = lerobot_rope
        vlm.set_attn_implementation(before)


def _export(module: torch.nn.Module, inputs: dict[str, torch.Tensor], outputs: list[str], path: Path,
            opset: int) -> None:
    torch.onnx.export(module, tuple(inputs.values()), str(path), input_names=list(inputs), output_names=outputs,
                      opset_version=opset, dynamo=True, verbose=False)


def _copy_processors(checkpoint: Path, out: Path) -> None:
    """What lerobot's processors and `PreTrainedConfig` need to load from `out` without the torch weights."""
    from zk0.learn.policy import VLM_DIR

    for path in checkpoint.iterdir():
        if path.is_file() and (path.name == "config.json" or path.name.startswith(("policy_preprocessor",
                                                                                   "policy_postprocessor"))):
            shutil.copy2(path, out / path.name)
    if (checkpoint / VLM_DIR).is_dir():
        shutil.copytree(checkpoint / VLM_DIR, out / VLM_DIR)


def _digests(folder: Path) -> dict[str, str]:
    from zk0.learn.checkpoint import sha256_file

    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.suffix in (".onnx", ".data")}


def _write_manifest(folder: Path, manifest: Manifest) -> None:
    (folder / MANIFEST).write_text(json.dumps(asdict(manifest), indent=1))


def export_policy(bundle: Any, checkpoint: str | Path, source_sha256: str, out_dir: str | Path,
                  options: ExportOptions = ExportOptions()) -> Manifest:
    """Write the ONNX graphs, the processors and manifest.json for `bundle` (loaded from `checkpoint`) into
    the new directory `out_dir` (atomically: a failed export leaves nothing)."""
    import onnx
    import onnxruntime

    from zk0.learn.checkpoint import write_dir_atomic

    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} exists: export writes a new directory")
    if options.quantize == "int8":  # quantized from the fp32 graphs, which are then dropped
        with tempfile.TemporaryDirectory(prefix=".zk0-onnx-fp32-", dir=out.parent) as scratch:
            export_policy(bundle, checkpoint, source_sha256, Path(scratch) / "fp32", replace(options, quantize="none"))
            return quantize_export(Path(scratch) / "fp32", out)
    policy = bundle.policy.eval()
    config = policy.config
    if config.adapt_to_pi_aloha or config.empty_cameras:
        raise ValueError("export covers SO-10x policies: adapt_to_pi_aloha and empty_cameras are not supported")
    inputs = example_inputs(config)
    with torch.no_grad():
        pad_masks, keys, values = PrefixGraph(policy)(*inputs.values())
    denoise_inputs = {"x_t": torch.zeros(1, config.chunk_size, config.max_action_dim), "timestep": torch.ones(1),
                      "prefix_pad_masks": pad_masks, "past_keys": keys, "past_values": values}

    def write(folder: Path) -> None:
        with torch.no_grad(), export_attention(policy):
            _export(PrefixGraph(policy).eval(), inputs, ["prefix_pad_masks", "past_keys", "past_values"],
                    folder / PREFIX_GRAPH, options.opset)
            _export(DenoiseGraph(policy).eval(), denoise_inputs, ["v_t"], folder / DENOISE_GRAPH, options.opset)
        _copy_processors(Path(checkpoint), folder)
        _write_manifest(folder, Manifest(
            source_sha256=source_sha256, opset=options.opset, steps=options.steps or config.num_steps,
            quantize="none", cameras={key: list(feature.shape) for key, feature in config.image_features.items()},
            state_dim=int(inputs["state"].shape[1]), lang_len=config.tokenizer_max_length,
            chunk_size=config.chunk_size, max_action_dim=config.max_action_dim,
            action_dim=config.action_feature.shape[0], prefix_len=int(pad_masks.shape[1]), kv_shape=list(keys.shape),
            tolerance=FP32_TOLERANCE, files=_digests(folder),
            versions={"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        ))

    write_dir_atomic(out, write)
    return read_manifest(out)


def quantize_export(fp32_dir: str | Path, out_dir: str | Path) -> Manifest:
    """Write the int8 dynamic quantization of the fp32 export `fp32_dir` (int8 weights per output channel of
    every MatMul/Gemm, activations quantized per call) as the new export `out_dir`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from zk0.learn.checkpoint import write_dir_atomic

    source, out = Path(fp32_dir), Path(out_dir)
    manifest = read_manifest(source)
    if manifest.quantize != "none":
        raise ValueError(f"{source} is already quantized ({manifest.quantize})")
    if out.exists():
        raise FileExistsError(f"{out} exists: export writes a new directory")

    def write(folder: Path) -> None:
        for path in source.iterdir():
            if path.is_dir():
                shutil.copytree(path, folder / path.name)
            elif path.suffix not in (".onnx", ".data") and path.name != MANIFEST:
                shutil.copy2(path, folder / path.name)
        with tempfile.TemporaryDirectory(prefix=".zk0-onnx-pre-", dir=out.parent) as scratch:
            for name in manifest.graphs.values():
                # The dynamo exporter leaves large frozen weights as Transpose(W) -> MatMul (onnxscript's
                # folding has a size limit), which quantize_dynamic skips: without ORT's own pre-processing
                # (constant folding) two thirds of the VLM's MatMuls, the vision tower's among them, stay fp32.
                folded = Path(scratch) / name
                quant_pre_process(source / name, folded, skip_symbolic_shape=True, save_as_external_data=True)
                quantize_dynamic(folded, folder / name, weight_type=QuantType.QInt8, per_channel=True)
        _write_manifest(folder, replace(manifest, quantize="int8", tolerance=None, files=_digests(folder)))

    write_dir_atomic(out, write)
    return read_manifest(out)
