"""Policy checkpoints in lerobot's `save_pretrained` layout, plus zk0 metadata, written atomically.

Layout of a checkpoint directory:
  config.json, model.safetensors            SmolVLAPolicy.save_pretrained (loadable with from_pretrained)
  policy_preprocessor*.json / .safetensors  the pre/post processors, carrying the normalization stats
  policy_postprocessor*
  zk0_stats.npz                             the federation's combined sufficient statistics (when given)
  vlm/                                      the VLM config + tokenizer when the VLM is a local directory
                                            (tiny / random-init models), so the checkpoint is self-contained
  zk0.json                                  run, round, parent, sha256 of model.safetensors, trainable names

A checkpoint `<parent>/<name>` is a symlink to a version directory `<parent>/.<name>.v<ns>-<pid>`. Each save
writes and fsyncs a new version, points a fresh symlink at it and renames that symlink over `<name>` (one
atomic step), then deletes older versions and leftovers. A crash at any moment leaves `<name>` naming a
complete checkpoint, the previous one or the new one; readers (lerobot's `from_pretrained`, `load_checkpoint`,
anything opening `<name>/zk0.json`) go through the link unaware of it. A real directory left at `<name>` by
older zk0 versions is swapped for the link atomically with renameat2(RENAME_EXCHANGE); where the kernel or
file system lacks it, the directory is renamed away first, leaving one instant without a checkpoint under the
name, once per such directory.

config.json names the VLM by its path in zk0's VLM store (see zk0.learn.policy): lerobot's own loaders
(`SmolVLAPolicy.from_pretrained`, `make_pre_post_processors`) load the checkpoint wherever that path exists,
and a hub id needs nothing local. `load_checkpoint` also works where the store lacks it: it restores the
store entry from the checkpoint's vlm/ copy, after which lerobot's loaders work on that host too if its store
is at the same path.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from zk0.learn.policy import VLM_DIR, PolicyBundle, resolve_checkpoint_vlm, trainable_names, vlm_files

META_FILE = "zk0.json"
STATS_FILE = "zk0_stats.npz"
WEIGHTS_FILE = "model.safetensors"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


class CheckpointInvalid(ValueError):
    """A checkpoint that must not be loaded: its weights do not match the SHA-256 it recorded."""


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


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


ATOMIC_TMP_GLOB = ".*.tmp-*"  # what an interrupted write_file_atomic / write_dir_atomic leaves behind


def write_file_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` in one step (tmp + fsync + rename + fsync of the folder): a crash leaves the
    old content or the new, never a torn file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def write_dir_atomic(dest: Path, write: Callable[[Path], None]) -> None:
    """Create the folder `dest` whole or not at all: `write(tmp)` fills a hidden sibling, which is fsynced and
    renamed into place. For folders that never change once written (zk0.agent.policy_store's versions);
    a crash leaves at most `.<name>.tmp-<pid>`, for the caller to clear."""
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        fsync_tree(tmp)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(dest.parent)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root`, deepest first, then `root`: nothing written under it is left
    only in the page cache."""
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        fsync_path(path)
    fsync_path(root)


def copy_local_vlm(vlm_name: str, dest: Path) -> None:
    """Copy the VLM directory `vlm_name` names (config + tokenizer, no weights) to `dest`; a hub id needs none."""
    source = Path(vlm_name)
    if not source.is_dir():
        return  # a hub id: resolvable wherever the checkpoint is loaded
    dest.mkdir()
    for item in vlm_files(source):
        shutil.copy2(item, dest / item.name)


def _exchange(a: Path, b: Path) -> None:
    """Swap two paths atomically (Linux renameat2 with RENAME_EXCHANGE); OSError where that is unavailable."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(b))


def _link_over_directory(link: Path, out: Path) -> None:
    """Put the symlink `link` where the real directory `out` is (written by older zk0 versions)."""
    try:
        _exchange(link, out)  # `link` now names the old directory; it goes with the other leftovers
    except OSError:
        os.replace(out, out.parent / f".{out.name}.legacy-{os.getpid()}")
        os.replace(link, out)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _remove_leftovers(out: Path, keep: Path) -> None:
    """Delete the versions `out` no longer names and what interrupted saves (of any zk0 version) left."""
    ours = re.compile(rf"\.{re.escape(out.name)}\.(v\d+-\d+|(link|legacy|tmp|old)-\d+)")
    for path in out.parent.iterdir():
        if ours.fullmatch(path.name) and path != keep:
            _remove(path)


def _publish(out: Path, version: Path) -> None:
    """Make `out` name the complete checkpoint `version` in one atomic step, then drop what it named before."""
    link = out.parent / f".{out.name}.link-{os.getpid()}"
    _remove(link)  # left by a save that died here (after a swap, the old directory itself)
    os.symlink(version.name, link)  # relative: the parent folder can be moved or copied whole
    if out.is_dir() and not out.is_symlink():
        _link_over_directory(link, out)
    else:
        os.replace(link, out)
    fsync_path(out.parent)
    _remove_leftovers(out, keep=version)


def publish_checkpoint(out_dir: str | Path, write: Callable[[Path], CheckpointMeta]) -> CheckpointMeta:
    """Atomically make `out_dir` a checkpoint that `write(version_dir)` fills in (everything but zk0.json).

    `write` returns the metadata to record; sha256 and created are filled in here. Shared by `save_checkpoint`
    and by zk0.agent.policy_store, which assembles checkpoints from stored files without building a policy.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    version = out.parent / f".{out.name}.v{time.time_ns()}-{os.getpid()}"
    try:
        meta = write(version)
        meta = CheckpointMeta(**{**asdict(meta), "sha256": sha256_file(version / WEIGHTS_FILE), "created": time.time()})
        (version / META_FILE).write_text(json.dumps(asdict(meta), indent=2))
        fsync_tree(version)
    except BaseException:
        shutil.rmtree(version, ignore_errors=True)
        raise
    _publish(out, version)
    return meta


def save_checkpoint(out_dir: str | Path, bundle: PolicyBundle, meta: CheckpointMeta, stats=None) -> CheckpointMeta:
    """Atomically write the checkpoint; returns its metadata with sha256 filled in. `stats`: SufficientStats."""

    def write(version: Path) -> CheckpointMeta:
        bundle.policy.save_pretrained(version)
        bundle.preprocessor.save_pretrained(version)
        bundle.postprocessor.save_pretrained(version)
        if stats is not None:
            import numpy as np

            np.savez(version / STATS_FILE, **stats.to_record())
        copy_local_vlm(bundle.policy.config.vlm_model_name, version / VLM_DIR)
        return CheckpointMeta(**{**asdict(meta), "trainable": trainable_names(bundle.policy)})

    return publish_checkpoint(out_dir, write)


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
        raise CheckpointInvalid(f"{root}: {WEIGHTS_FILE} sha256 {actual[:12]} != recorded {meta.sha256[:12]}")
    config = PreTrainedConfig.from_pretrained(root)
    config.device = device
    pre_overrides: dict[str, Any] = {"device_processor": {"device": device}, **resolve_checkpoint_vlm(root, config)}
    policy = SmolVLAPolicy.from_pretrained(root, config=config)
    pre, post = make_pre_post_processors(config, pretrained_path=str(root), preprocessor_overrides=pre_overrides)
    return PolicyBundle(policy, pre, post), meta
