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
    assert [p.name for p in tmp_path.iterdir()] == ["round_3"]  # no temp dirs left behind

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
