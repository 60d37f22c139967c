"""The onnxruntime inference backend: an exported policy (zk0.learn.onnx_export) behind SmolVLA's policy interface.

`OnnxPolicy` answers what the rollout and validation ask of a `SmolVLAPolicy` — `config`, `reset`,
`select_action(batch, noise=None)` (one action, from a queue refilled a chunk at a time, as lerobot does),
`predict_action_chunk(batch, noise=None)`, `to`, `eval` — so lerobot's `SyncInferenceEngine` and zk0's lockstep
`PolicyController` drive it unchanged, with lerobot's own pre/post processors (loaded from the export folder).
RTC is not offered: its guidance differentiates the denoiser with torch autograd.

`load_backend(checkpoint, device, backend)` is the drop-in for `zk0.learn.checkpoint.load_checkpoint` that the
rollout and validation use: "torch" is `load_checkpoint`; "onnxruntime" exports the checkpoint once into
`onnx_store()` (content-addressed by its SHA-256 and the export options) and returns an `OnnxPolicy` bundle,
so the torch weights are not kept in memory while the robot runs.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zk0.learn.onnx_export import MANIFEST, ExportOptions, Manifest, read_manifest

BACKENDS = ("torch", "onnxruntime")


def onnx_store() -> Path:
    """Where `load_backend` keeps exports: $XDG_CACHE_HOME/zk0/onnx (~/.cache), beside zk0's VLM store."""
    from zk0.common.cache import zk0_cache

    return zk0_cache() / "onnx"


def verify_files(export_dir: Path, manifest: Manifest) -> None:
    """Refuse an export whose graphs or weights are not the ones its manifest names (damaged or tampered)."""
    from zk0.learn.checkpoint import sha256_file

    for name, digest in manifest.files.items():
        if sha256_file(export_dir / name) != digest:
            raise ValueError(f"{export_dir / name}: SHA-256 does not match the export's manifest")


# Below this much graph (weights included), onnxruntime runs fastest on one intra-op thread: handing each small
# op to a pool costs more than it saves. Measured on 2 cores: the tiny export (1.5 MB) takes 3.2 ms a chunk on
# one thread and 7.3 ms on two; the full-size one (1.5 GB) 3.9 s on one and 2.0 s on two.
SMALL_GRAPH_BYTES = 16 * 2**20


def default_threads(graph_bytes: int) -> int:
    """onnxruntime's intra-op threads for a graph of `graph_bytes` when none are asked for: 1 for a small
    graph, else 0 (onnxruntime's own choice, one per physical core)."""
    return 1 if graph_bytes < SMALL_GRAPH_BYTES else 0


def session(path: Path, threads: int | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    graph_bytes = sum(p.stat().st_size for p in (path, path.with_name(path.name + ".data")) if p.exists())
    options.intra_op_num_threads = threads or default_threads(graph_bytes)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxPolicy:
    """A SmolVLA export run by onnxruntime on the CPU; `threads` sets onnxruntime's intra-op threads (None: one
    for a small graph, else one per core: `default_threads`)."""

    def __init__(self, export_dir: str | Path, threads: int | None = None) -> None:
        from lerobot.configs import PreTrainedConfig

        self.export_dir = Path(export_dir)
        self.manifest: Manifest = read_manifest(self.export_dir)
        verify_files(self.export_dir, self.manifest)
        self.config = PreTrainedConfig.from_pretrained(self.export_dir)
        self.config.device = "cpu"
        self.prefix_session = session(self.export_dir / self.manifest.graphs["prefix"], threads)
        self.denoise_session = session(self.export_dir / self.manifest.graphs["denoise"], threads)
        self._queue: deque[torch.Tensor] = deque(maxlen=self.config.n_action_steps)

    def reset(self) -> None:
        self._queue.clear()

    def eval(self) -> OnnxPolicy:
        return self

    def to(self, device: str | torch.device) -> OnnxPolicy:
        if torch.device(device).type != "cpu":
            raise ValueError(f"the onnxruntime backend runs on the CPU, not {device}")
        return self

    def prefix_feeds(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        """The prefix graph's inputs from a pre-processed batch; language padded to the export's fixed length."""
        from lerobot.utils.constants import OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS, OBS_STATE

        m = self.manifest
        tokens = batch[OBS_LANGUAGE_TOKENS].cpu().numpy().astype(np.int64)
        masks = batch[OBS_LANGUAGE_ATTENTION_MASK].cpu().numpy().astype(bool)
        if tokens.shape[0] != 1 or tokens.shape[1] > m.lang_len:
            raise ValueError(f"language tokens {tokens.shape}: the export takes batch 1, at most {m.lang_len}")
        pad = m.lang_len - tokens.shape[1]
        # Padding tokens carry mask 0: no prefix token attends to them, so the actions do not change.
        feeds = {"state": _state(batch[OBS_STATE]), "lang_tokens": np.pad(tokens, ((0, 0), (0, pad))),
                 "lang_masks": np.pad(masks, ((0, 0), (0, pad)))}
        for i, (key, shape) in enumerate(m.cameras.items()):
            image = batch[key].cpu().numpy().astype(np.float32)
            image = image[:, -1] if image.ndim == 5 else image
            if tuple(image.shape) != (1, *shape):
                raise ValueError(f"{key}: image {tuple(image.shape)}, the export takes {(1, *shape)}")
            feeds[f"image_{i}"] = image
        return feeds

    def predict_action_chunk(self, batch: dict[str, Any], noise: torch.Tensor | None = None,
                             **kwargs: Any) -> torch.Tensor:
        """Normalized actions [1, chunk_size, action_dim], as `SmolVLAPolicy.predict_action_chunk`."""
        if any(kwargs.get(k) is not None for k in ("inference_delay", "prev_chunk_left_over")):
            raise ValueError("RTC guidance needs torch autograd: use the sync engine with the onnxruntime backend")
        m = self.manifest
        if noise is None:  # lerobot's sample_noise: standard normal from torch's global generator
            noise = torch.normal(0.0, 1.0, size=(1, m.chunk_size, m.max_action_dim))
        pad_masks, keys, values = self.prefix_session.run(None, self.prefix_feeds(batch))
        # lerobot's euler_integrate, step for step: time = 1 + step * dt in float32, x += dt * v
        x_t = noise.cpu().numpy().astype(np.float32)
        dt = -1.0 / m.steps
        for step in range(m.steps):
            (v_t,) = self.denoise_session.run(None, {"x_t": x_t, "timestep": np.full(1, 1.0 + step * dt, np.float32),
                                              "prefix_pad_masks": pad_masks, "past_keys": keys, "past_values": values})
            x_t = x_t + np.float32(dt) * v_t
        return torch.from_numpy(x_t[:, :, : m.action_dim])

    def select_action(self, batch: dict[str, Any], noise: torch.Tensor | None = None) -> torch.Tensor:
        """One normalized action [1, action_dim]; a new chunk when the previous one is used up."""
        if not self._queue:
            chunk = self.predict_action_chunk(batch, noise)
            self._queue.extend(chunk.transpose(0, 1)[: self.config.n_action_steps])
        return self._queue.popleft()


def _state(state: torch.Tensor) -> np.ndarray:
    state = state[:, -1] if state.ndim > 2 else state
    return state.cpu().numpy().astype(np.float32)


def load_onnx_bundle(export_dir: str | Path, threads: int | None = None) -> Any:
    """An `OnnxPolicy` with lerobot's pre/post processors from the export folder (a zk0 PolicyBundle)."""
    from lerobot.policies import make_pre_post_processors

    from zk0.learn.policy import PolicyBundle, resolve_checkpoint_vlm

    policy = OnnxPolicy(export_dir, threads)
    overrides = {"device_processor": {"device": "cpu"}, **resolve_checkpoint_vlm(Path(export_dir), policy.config)}
    pre, post = make_pre_post_processors(policy.config, pretrained_path=str(export_dir),
                                         preprocessor_overrides=overrides)
    return PolicyBundle(policy, pre, post)


def ensure_export(checkpoint: str | Path, options: ExportOptions = ExportOptions(),
                  store: Path | None = None) -> Path:
    """The export of `checkpoint` with `options` in `store` (default `onnx_store()`), made if missing."""
    from zk0.learn.checkpoint import load_checkpoint, read_meta
    from zk0.learn.onnx_export import export_policy

    sha = read_meta(checkpoint).sha256
    target = (store or onnx_store()) / f"{sha[:16]}-{options.key()}"
    if not target.exists():
        bundle, meta = load_checkpoint(checkpoint)  # verifies the weights against `sha`
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            export_policy(bundle, checkpoint, meta.sha256, target, options)
        except OSError:  # another process may have exported it meanwhile: same weights, same options
            if not (target / MANIFEST).is_file():
                raise
    if read_manifest(target).source_sha256 != sha:
        raise ValueError(f"{target} holds an export of other weights than {checkpoint}: remove it")
    return target


def load_backend(checkpoint: str | Path, device: str = "cpu", backend: str = "torch",
                 options: ExportOptions = ExportOptions()) -> tuple[Any, Any]:
    """(PolicyBundle, CheckpointMeta) of `checkpoint` for `backend` ("torch" or "onnxruntime")."""
    from zk0.learn.checkpoint import load_checkpoint, read_meta

    if backend == "torch":
        return load_checkpoint(checkpoint, device=device)
    if backend != "onnxruntime":
        raise ValueError(f"unknown inference backend {backend!r} ({' or '.join(BACKENDS)})")
    if torch.device(device).type != "cpu":
        raise ValueError(f"the onnxruntime backend runs on the CPU, not {device}")
    return load_onnx_bundle(ensure_export(checkpoint, options)), read_meta(checkpoint)
