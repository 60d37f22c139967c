import json
from pathlib import Path

import pytest
import torch

from zk0.learn.checkpoint import CheckpointMeta, load_checkpoint, read_meta, save_checkpoint


def _actions(bundle, batch, noise):
    bundle.policy.eval()
    with torch.no_grad():
        return bundle.postprocessor(bundle.policy.predict_action_chunk(bundle.preprocessor(dict(batch)), noise=noise))


def test_checkpoint_round_trips_and_loads_with_lerobot(tiny_setup, tmp_path):
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    bundle, train, _ = tiny_setup
    out = tmp_path / "round_3"
    meta = save_checkpoint(out, bundle, CheckpointMeta(run="run-a", round=3, parent="ab" * 32))
    assert read_meta(out) == meta and len(meta.sha256) == 64 and meta.trainable
    # the name links to one version directory, and nothing else is left behind
    assert out.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == sorted(["round_3", out.readlink().name])

    batch = train.batch(train.frame_index()[:2])
    noise = torch.randn(2, bundle.policy.config.chunk_size, bundle.policy.config.max_action_dim)
    loaded, loaded_meta = load_checkpoint(out)
    torch.testing.assert_close(_actions(loaded, batch, noise), _actions(bundle, batch, noise))
    assert loaded_meta.round == 3 and loaded_meta.parent == "ab" * 32

    plain = SmolVLAPolicy.from_pretrained(out)
    plain.eval()
    with torch.no_grad():
        raw = plain.predict_action_chunk(bundle.preprocessor(dict(batch)), noise=noise)
    torch.testing.assert_close(bundle.postprocessor(raw), _actions(bundle, batch, noise))

    save_checkpoint(out, bundle, CheckpointMeta(run="run-a", round=4))  # replaces in place
    assert read_meta(out).round == 4


def test_tampered_weights_are_refused(tiny_setup, tmp_path):
    bundle, _, _ = tiny_setup
    out = tmp_path / "ckpt"
    save_checkpoint(out, bundle, CheckpointMeta(run="r", round=0))
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_checkpoint(out)


class _Crash(BaseException):
    """A process dying mid-save: nothing after it runs (not even `except Exception` handlers)."""


def _crash_at(monkeypatch, k: int) -> list[int]:
    """Make the k-th file-system step of a save (rename, link, unlink, tree removal, swap) die."""
    import os
    import shutil

    from zk0.learn import checkpoint

    calls = [0]

    def dying(real):
        def step(*args, **kwargs):
            calls[0] += 1
            if calls[0] == k:
                raise _Crash(f"crash at step {k}")
            return real(*args, **kwargs)
        return step

    for module, name in ((os, "replace"), (os, "rename"), (os, "symlink"), (os, "unlink"), (shutil, "rmtree"),
                         (checkpoint, "_exchange"), (checkpoint, "fsync_tree")):
        monkeypatch.setattr(module, name, dying(getattr(module, name)))
    return calls


def _old_checkpoint(out, bundle, start: str) -> None:
    """Round 3 at `out`: a link (zk0 today), or a real directory (as zk0 wrote checkpoints before)."""
    import shutil

    for path in out.parent.iterdir():
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    staged = out if start == "link" else out.parent / "staged"
    save_checkpoint(staged, bundle, CheckpointMeta(run="r", round=3))
    if start != "link":
        shutil.copytree(staged, out)
        shutil.rmtree(staged.resolve())
        staged.unlink()


@pytest.mark.parametrize("start", ["link", "older directory"])
def test_a_crash_at_any_step_leaves_the_old_or_the_new_checkpoint(tiny_setup, tmp_path, monkeypatch, start):
    bundle, _, _ = tiny_setup
    out = tmp_path / "round_3"
    seen = set()
    for k in range(1, 100):
        _old_checkpoint(out, bundle, start)
        with monkeypatch.context() as patch:
            calls = _crash_at(patch, k)
            try:
                save_checkpoint(out, bundle, CheckpointMeta(run="r", round=4))
                crashed = False
            except _Crash:
                crashed = True
        _, meta = load_checkpoint(out)  # weights checked against their recorded sha256
        assert meta.round in (3, 4), f"crash at step {k}"
        seen.add(meta.round)
        if not crashed:
            assert calls[0] < k
            break
    else:
        pytest.fail("save never completed")
    assert seen == {3, 4} and read_meta(out).round == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["round_3", out.readlink().name])


def test_a_checkpoint_loads_from_a_copy_after_every_temporary_directory_is_gone(tmp_path, monkeypatch):
    """Acceptance (#11.12): lerobot's own loaders, on a copy, with no zk0 temporary directory left."""
    import glob
    import shutil
    import tempfile

    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata
    from lerobot.policies import make_pre_post_processors
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    from tests.learn.conftest import make_dataset
    from zk0.learn.data import EpisodeData, policy_image_size
    from zk0.learn.frame_cache import FrameCache
    from zk0.learn.policy import PolicySpec, make_policy_bundle, vlm_store

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "host-a-cache"))
    root = tmp_path / "data" / "pick"
    make_dataset(root, episodes=1, frames=12)
    meta = LeRobotDatasetMetadata("local/pick", root=root)
    bundle = make_policy_bundle(PolicySpec(model="tiny", chunk_size=10, n_action_steps=10), meta)
    save_checkpoint(tmp_path / "ckpt", bundle, CheckpointMeta(run="r", round=1))
    copy = Path(shutil.copytree(tmp_path / "ckpt", tmp_path / "elsewhere" / "copy"))
    for leftover in glob.glob(str(Path(tempfile.gettempdir()) / "zk0-vlm-*")):
        shutil.rmtree(leftover, ignore_errors=True)
    assert str(vlm_store()) in json.loads((copy / "config.json").read_text())["vlm_model_name"]

    data = EpisodeData(root, 10, policy_image_size(bundle.policy.config), FrameCache())
    batch = data.batch(data.frame_index()[:2])
    noise = torch.randn(2, 10, bundle.policy.config.max_action_dim)
    expected = _actions(bundle, batch, noise)

    def lerobot_actions(path: Path) -> torch.Tensor:
        policy = SmolVLAPolicy.from_pretrained(path)
        pre, post = make_pre_post_processors(policy.config, pretrained_path=str(path))
        with torch.no_grad():
            return post(policy.predict_action_chunk(pre(dict(batch)), noise=noise))

    torch.testing.assert_close(lerobot_actions(copy), expected)

    # Another host, whose VLM store lacks the entry: zk0's loader restores it from the copy's vlm/ ...
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "host-b-cache"))
    shutil.rmtree(tmp_path / "host-a-cache")
    with pytest.raises(OSError, match="host-a-cache/zk0/vlm"):  # lerobot's loaders cannot find it there
        SmolVLAPolicy.from_pretrained(copy)
    loaded, _ = load_checkpoint(copy)
    torch.testing.assert_close(_actions(loaded, batch, noise), expected)
    # ... after which lerobot's loaders work there too when the store sits where the checkpoint says
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "host-a-cache"))
    load_checkpoint(copy)
    torch.testing.assert_close(lerobot_actions(copy), expected)
