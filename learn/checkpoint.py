"""Policy checkpoints in lerobot's `save_pretrained` layout, plus zk0 metadata, written atomically.

Layout of a checkpoint directory:
  config.json, model.safetensors            SmolVLAPolicy.save_pretrained (loadable with from_pretrained)
  policy_preprocessor*.json / .safetensors  the pre/post processors, carrying the normalization stats
  policy_postprocessor*
  zk0_stats.npz                             the federation's combined sufficient statistics (when given)
  vlm/                                      the VLM config + tokenizer when the VLM is a local directory
                                            (tiny / random-init models), so the checkpoint is self-contained
  zk0.json                                  run, round, parent, sha256 of model.safetensors, trainable names

Everything is written into a temporary sibling directory, fsynced, then renamed into place, so a crash
never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from zk0.learn.policy import PolicyBundle, trainable_names

META_FILE = "zk0.json"
STATS_FILE = "zk0_stats.npz"
VLM_DIR = "vlm"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class CheckpointMeta:
    run: str
    round: int
    parent: str | None = None  # sha256 of the checkpoint this one was trained from
    sha256: str = ""  # of model.safetensors, filled in on save
    created: float = 0.0
    trainable: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_local_vlm(vlm_name: str, dest: Path) -> None:
    source = Path(vlm_name)
    if not source.is_dir():
        return  # a hub id: resolvable wherever the checkpoint is loaded
    dest.mkdir()
    for item in source.iterdir():
        if item.is_file() and item.suffix in (".json", ".jinja", ".txt"):
            shutil.copy2(item, dest / item.name)


def save_checkpoint(out_dir: str | Path, bundle: PolicyBundle, meta: CheckpointMeta, stats=None) -> CheckpointMeta:
    """Atomically write the checkpoint; returns its metadata with sha256 filled in. `stats`: SufficientStats."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        bundle.policy.save_pretrained(tmp)
        bundle.preprocessor.save_pretrained(tmp)
        bundle.postprocessor.save_pretrained(tmp)
        if stats is not None:
            import numpy as np

            np.savez(tmp / STATS_FILE, **stats.to_record())
        _copy_local_vlm(bundle.policy.config.vlm_model_name, tmp / VLM_DIR)
        meta = CheckpointMeta(**{**asdict(meta), "sha256": sha256_file(tmp / WEIGHTS_FILE),
                                 "created": time.time(), "trainable": trainable_names(bundle.policy)})
        (tmp / META_FILE).write_text(json.dumps(asdict(meta), indent=2))
        _fsync_tree(tmp)
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def read_meta(path: str | Path) -> CheckpointMeta:
    return CheckpointMeta(**json.loads((Path(path) / META_FILE).read_text()))


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[PolicyBundle, CheckpointMeta]:
    """Load policy + processors; refuses a checkpoint whose weights do not match the recorded sha256."""
    from lerobot.configs import PreTrainedConfig
    from lerobot.policies import make_pre_post_processors
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    root = Path(path)
    meta = read_meta(root)
    actual = sha256_file(root / WEIGHTS_FILE)
    if actual != meta.sha256:
        raise ValueError(f"{root}: {WEIGHTS_FILE} sha256 {actual[:12]} != recorded {meta.sha256[:12]}")
    config = PreTrainedConfig.from_pretrained(root)
    config.device = device
    pre_overrides: dict[str, Any] = {"device_processor": {"device": device}}
    if not Path(config.vlm_model_name).exists() and (root / VLM_DIR).is_dir():
        # the VLM directory it was trained with lived elsewhere: use the copy kept in the checkpoint
        config.vlm_model_name = str(root / VLM_DIR)
        pre_overrides["tokenizer_processor"] = {"tokenizer_name": config.vlm_model_name}
    policy = SmolVLAPolicy.from_pretrained(root, config=config)
    pre, post = make_pre_post_processors(config, pretrained_path=str(root), preprocessor_overrides=pre_overrides)
    return PolicyBundle(policy, pre, post), meta
