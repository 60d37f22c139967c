"""ONNX export of the tiny SmolVLA, run by real onnxruntime: the manifest, fp32 parity with torch on the same
inputs and noise, the policy interface the rollout and validation use, int8 quantization, the export cache and
a tampered export refused."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from zk0.learn.checkpoint import CheckpointMeta, read_meta, save_checkpoint
from zk0.learn.onnx_export import (DEFAULT_OPSET, FP32_TOLERANCE, ExportOptions, concatenated_rope, export_policy,
                                   quantize_export, read_manifest)
from zk0.learn.onnx_parity import TASK, measure, raw_observation
from zk0.learn.onnx_runtime import (SMALL_GRAPH_BYTES, OnnxPolicy, default_threads, ensure_export, load_backend,
                                    load_onnx_bundle)


@pytest.fixture(scope="module")
def exported(tiny_setup, tmp_path_factory):
    """(torch bundle, its checkpoint, its fp32 export with 4 steps)."""
    bundle, _, _ = tiny_setup
    root = tmp_path_factory.mktemp("onnx")
    meta = save_checkpoint(root / "checkpoint", bundle, CheckpointMeta(run="onnx", round=1))
    export_policy(bundle, root / "checkpoint", meta.sha256, root / "export", ExportOptions(steps=4))
    return bundle, root / "checkpoint", root / "export"


def test_manifest_names_shapes_source_and_tolerance(exported) -> None:
    bundle, checkpoint, export = exported
    config, manifest = bundle.policy.config, read_manifest(export)
    assert manifest.source_sha256 == read_meta(checkpoint).sha256
    assert (manifest.steps, manifest.quantize, manifest.opset, manifest.tolerance) == (
        4, "none", DEFAULT_OPSET, FP32_TOLERANCE)
    assert manifest.cameras == {key: list(f.shape) for key, f in config.image_features.items()}
    assert (manifest.chunk_size, manifest.action_dim, manifest.lang_len) == (10, 6, config.tokenizer_max_length)
    assert set(manifest.files) >= {"prefix.onnx", "denoise.onnx"}
    with pytest.raises(FileExistsError):
        export_policy(bundle, checkpoint, manifest.source_sha256, export)


def test_fp32_actions_match_torch(exported) -> None:
    bundle, _, export = exported
    result = measure(bundle, load_onnx_bundle(export), trials=2)
    assert result.passed and result.max_abs_normalized <= FP32_TOLERANCE and result.steps == 4
    assert bundle.policy.config.num_steps == 4  # measure compares at the export's step count
    bundle.policy.config.num_steps = 10


def test_prefix_attention_is_plain_and_the_policy_keeps_its_own(exported) -> None:
    """The export traces eager attention (the vision tower's without its all-true mask): no SDPA NaN guard
    (IsNaN) in the graph; the torch policy is left on its own attention."""
    import onnx

    bundle, _, export = exported
    ops = [node.op_type for node in onnx.load(str(export / "prefix.onnx"), load_external_data=False).graph.node]
    vlm = bundle.policy.model.vlm_with_expert.vlm
    assert "Softmax" in ops and "IsNaN" not in ops
    assert vlm.config._attn_implementation == vlm.model.vision_model.config._attn_implementation == "sdpa"


def test_small_graphs_run_on_one_thread() -> None:
    assert default_threads(SMALL_GRAPH_BYTES - 1) == 1
    assert default_threads(SMALL_GRAPH_BYTES) == 0  # onnxruntime's own choice: a thread per physical core


def test_select_action_serves_a_chunk_like_lerobot(exported) -> None:
    from lerobot.policies.utils import prepare_observation_for_inference

    bundle, _, export = exported
    onnx = load_onnx_bundle(export)
    policy = onnx.policy
    assert policy.to("cpu") is policy and policy.eval() is policy
    frame = raw_observation(policy.config, np.random.default_rng(1))
    batch = bundle.preprocessor(prepare_observation_for_inference(dict(frame), torch.device("cpu"), TASK, "so101"))
    noise = torch.randn(1, policy.manifest.chunk_size, policy.manifest.max_action_dim)
    chunk = policy.predict_action_chunk(dict(batch), noise=noise)
    policy.reset()
    actions = [policy.select_action(dict(batch), noise=noise) for _ in range(policy.config.n_action_steps)]
    torch.testing.assert_close(torch.stack(actions, dim=1), chunk)
    assert policy.select_action(dict(batch)).shape == (1, 6)  # the queue ran dry: a new chunk, fresh noise
    with pytest.raises(ValueError, match="RTC"):
        policy.predict_action_chunk(dict(batch), inference_delay=2, prev_chunk_left_over=chunk[0])
    with pytest.raises(ValueError, match="CPU"):
        policy.to("cuda")


def test_int8_quantization_loads_and_stays_close(exported, tmp_path) -> None:
    bundle, _, export = exported
    manifest = quantize_export(export, tmp_path / "int8")
    assert (manifest.quantize, manifest.tolerance, manifest.steps) == ("int8", None, 4)
    fp32_bytes = sum(p.stat().st_size for p in export.glob("*.onnx*"))
    assert sum(p.stat().st_size for p in (tmp_path / "int8").glob("*.onnx*")) < fp32_bytes
    result = measure(bundle, load_onnx_bundle(tmp_path / "int8"), trials=1)
    bundle.policy.config.num_steps = 10
    assert result.passed is None and 0 < result.max_abs_normalized < 0.5
    with pytest.raises(ValueError, match="already quantized"):
        quantize_export(tmp_path / "int8", tmp_path / "again")


def test_export_cache_and_tampering(exported, tmp_path, monkeypatch) -> None:
    _, checkpoint, export = exported
    sha = read_manifest(export).source_sha256
    options = ExportOptions(steps=4)
    cached = tmp_path / f"{sha[:16]}-{options.key()}"
    shutil.copytree(export, cached)
    assert ensure_export(checkpoint, options, store=tmp_path) == cached  # found, not exported again
    monkeypatch.setattr("zk0.learn.onnx_runtime.onnx_store", lambda: tmp_path)
    bundle, meta = load_backend(checkpoint, "cpu", "onnxruntime", options)
    assert isinstance(bundle.policy, OnnxPolicy) and meta.sha256 == sha
    with pytest.raises(ValueError, match="unknown inference backend"):
        load_backend(checkpoint, "cpu", "tensorrt")
    graph = cached / "denoise.onnx"
    graph.write_bytes(graph.read_bytes()[:-1] + b"\0")
    with pytest.raises(ValueError, match="SHA-256"):
        OnnxPolicy(cached)


def test_concatenated_rope_is_lerobots_rope_value_for_value() -> None:
    from lerobot.policies.smolvla.smolvlm_with_expert import apply_rope

    generator = torch.Generator().manual_seed(0)
    for heads, head_dim in ((15, 64), (5, 64), (4, 16)):
        x = torch.randn(2, 37, heads, head_dim, generator=generator)
        positions = torch.randint(0, 300, (2, 37), generator=generator)
        assert torch.equal(concatenated_rope(x, positions), apply_rope(x, positions))
