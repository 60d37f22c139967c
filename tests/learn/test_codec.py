"""Update codecs: stated error bounds, and refusal of every damaged or mismatching payload."""

from __future__ import annotations

import pytest
import torch

from zk0.learn.codec import (
    CODECS,
    ChecksumMismatch,
    CodecError,
    LayoutMismatch,
    NonFinite,
    PayloadCorrupt,
    decode,
    encode,
    from_array_record,
    payload_size,
    report,
    to_array_record,
)


def _global_and_update(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    base = {
        "expert.layers.0.mlp.up_proj.weight": torch.randn(48, 32, generator=gen),
        "expert.layers.0.mlp.up_proj.bias": torch.randn(48, generator=gen),
        "action_out_proj.weight": torch.randn(6, 48, generator=gen) * 10,
        "state_proj.scale": torch.randn((), generator=gen),
    }
    # Rows of very different magnitude, as after a local step where some units barely move.
    update = {}
    for key, value in base.items():
        broadcast_shape = tuple(value.shape[:1]) + (1,) * max(value.dim() - 1, 0)
        row_magnitude = torch.rand(broadcast_shape, generator=gen)
        update[key] = value + 1e-2 * row_magnitude * torch.randn(value.shape, generator=gen)
    return base, update


@pytest.mark.parametrize("codec", list(CODECS))
def test_every_codec_round_trips_within_its_stated_bound(codec):
    base, update = _global_and_update()
    payload = encode(update, codec, base)
    assert len(payload) == payload_size(update, codec)
    decoded = decode(payload, base)
    assert set(decoded) == set(update)
    for key, sent in update.items():
        got = decoded[key]
        assert got.shape == sent.shape and got.dtype == sent.dtype
        err = (got - sent).abs()
        if codec == "fp32":
            assert torch.equal(got, sent)
        elif codec == "bf16":
            rounding = 4 * torch.finfo(torch.float32).eps * (sent.abs() + base[key].abs())
            assert (err <= sent.abs() * 2**-8).all()
            assert (err <= (sent - base[key]).abs() * 2**-8 + rounding).all()
        else:
            delta = (sent - base[key]).reshape(-1) if codec == "int8-delta" or sent.dim() < 2 else None
            rows = delta[None] if delta is not None else (sent - base[key]).reshape(sent.shape[0], -1)
            scale = rows.abs().amax(dim=1) / 127
            bound = scale[:, None] / 2 + 4 * torch.finfo(torch.float32).eps * (
                sent.abs().reshape(rows.shape) + base[key].abs().reshape(rows.shape))
            assert (err.reshape(rows.shape) <= bound).all()


@pytest.mark.parametrize("codec", ["bf16", "int8-delta", "int8-delta-row"])
def test_a_small_update_to_larger_weights_survives(codec):
    """bfloat16 of a weight near 0.03 moves in steps of ~1.2e-4: a 1e-5 step survives only as a delta."""
    gen = torch.Generator().manual_seed(5)
    base = {"w": 0.03 + 0.001 * torch.randn(64, 32, generator=gen)}
    step = 1e-5 * torch.ones(64, 32)
    decoded = decode(encode({"w": base["w"] + step}, codec, base), base)
    torch.testing.assert_close(decoded["w"] - base["w"], step, rtol=0.01, atol=0)


def test_every_delta_codec_refuses_to_encode_without_the_global():
    _, update = _global_and_update()
    for codec in ("bf16", "int8-delta", "int8-delta-row"):
        with pytest.raises(ValueError, match="needs the round's global"):
            encode(update, codec)


def test_a_payload_of_another_format_version_is_refused():
    import hashlib

    base, update = _global_and_update()
    payload = bytearray(encode(update, "bf16", base))
    payload[4] = 1  # version 1 sent bf16 of the weights, not of the delta
    payload[-32:] = hashlib.sha256(payload[:-32]).digest()
    with pytest.raises(PayloadCorrupt, match="version 1"):
        decode(bytes(payload), base)


def test_decode_returns_new_tensors_and_leaves_the_global_alone():
    base, update = _global_and_update()
    before = {k: v.clone() for k, v in base.items()}
    decoded = decode(encode(update, "int8-delta", base), base)
    for key in base:
        assert torch.equal(base[key], before[key])
        assert decoded[key].data_ptr() != base[key].data_ptr()


def test_per_row_scaling_is_tighter_on_rows_of_different_magnitude():
    base, update = _global_and_update()
    errors = {}
    for codec in ("int8-delta", "int8-delta-row"):
        decoded = decode(encode(update, codec, base), base)
        errors[codec] = sum(((decoded[k] - update[k]) ** 2).sum().item() for k in update)
    assert errors["int8-delta-row"] < errors["int8-delta"] / 2


@pytest.mark.parametrize("codec", list(CODECS))
def test_a_flipped_byte_anywhere_is_rejected(codec):
    base, update = _global_and_update()
    payload = encode(update, codec, base)
    for position in (0, 20, len(payload) // 2, len(payload) - 40, len(payload) - 1):
        damaged = bytearray(payload)
        damaged[position] ^= 0x01
        with pytest.raises(CodecError):
            decode(bytes(damaged), base)


def test_a_flipped_body_byte_is_a_checksum_mismatch():
    base, update = _global_and_update()
    damaged = bytearray(encode(update, "bf16", base))
    damaged[len(damaged) // 2] ^= 0x80
    with pytest.raises(ChecksumMismatch, match="SHA-256"):
        decode(bytes(damaged), base)


def test_truncated_and_garbage_payloads_are_rejected():
    base, update = _global_and_update()
    payload = encode(update, "int8-delta", base)
    with pytest.raises(PayloadCorrupt, match="truncated"):
        decode(payload[:-1], base)
    with pytest.raises(PayloadCorrupt, match="too short"):
        decode(payload[:10], base)
    with pytest.raises(PayloadCorrupt, match="marker"):
        decode(b"\x00" * len(payload), base)


@pytest.mark.parametrize("codec", ["fp32", "bf16"])
def test_nan_is_refused_by_sender_and_receiver(codec):
    import hashlib

    base, update = _global_and_update()
    update["action_out_proj.weight"][0, 0] = float("nan")
    with pytest.raises(NonFinite, match="action_out_proj.weight"):
        encode(update, codec, base)
    # A sender that skips the check: the receiver still refuses the intact, correctly hashed payload.
    clean = {k: v.nan_to_num(0.0) for k, v in update.items()}
    payload = bytearray(encode(clean, codec, base))
    key_order = sorted(clean)
    offset = len(payload) - 32 - sum(CODECS[codec].body_size(tuple(clean[k].shape)) for k in key_order)
    for key in key_order:
        if key == "action_out_proj.weight":
            break
        offset += CODECS[codec].body_size(tuple(clean[key].shape))
    nan = torch.tensor([float("nan")], dtype=torch.float32 if codec == "fp32" else torch.bfloat16)
    raw = nan.view(torch.uint8).numpy().tobytes()
    payload[offset:offset + len(raw)] = raw
    payload[-32:] = hashlib.sha256(payload[:-32]).digest()
    with pytest.raises(NonFinite, match="action_out_proj.weight"):
        decode(bytes(payload), base)


def test_wrong_keys_shapes_dtypes_or_global_are_rejected():
    base, update = _global_and_update()
    payload = encode(update, "int8-delta", base)
    missing = {k: v for k, v in base.items() if k != "state_proj.scale"}
    with pytest.raises(LayoutMismatch, match="state_proj.scale"):
        decode(payload, missing)
    reshaped = dict(base, **{"action_out_proj.weight": torch.zeros(6, 49)})
    with pytest.raises(LayoutMismatch, match="action_out_proj.weight.*shape"):
        decode(payload, reshaped)
    half = dict(base, **{"action_out_proj.weight": base["action_out_proj.weight"].to(torch.bfloat16)})
    with pytest.raises(LayoutMismatch, match="dtype"):
        decode(payload, half)
    other_round = {k: v + 1 for k, v in base.items()}
    with pytest.raises(LayoutMismatch, match="different global"):
        decode(payload, other_round)
    with pytest.raises(LayoutMismatch, match="update keys"):
        encode(update, "int8-delta", missing)


def test_flower_array_record_carries_the_checked_payload():
    from flwr.app import ArrayRecord

    base, update = _global_and_update()
    payload = encode(update, "int8-delta-row", base)
    record = to_array_record(payload)
    assert isinstance(record, ArrayRecord)
    # Through Flower's own object serialization, as the transport does it.
    restored = ArrayRecord.inflate(record.deflate(), children=record.children)
    assert from_array_record(restored) == payload
    assert decode(from_array_record(restored), base).keys() == update.keys()
    with pytest.raises(PayloadCorrupt, match="zk0.update"):
        from_array_record(ArrayRecord({"other": to_array_record(payload)["zk0.update"]}))


def test_report_lists_tensors_and_bytes_per_codec_from_shapes_alone():
    with torch.device("meta"):
        tensors = {"w": torch.empty(1000, 64), "b": torch.empty(1000)}
    summary = report(tensors)
    assert summary["parameters"] == 65_000 and summary["tensor_count"] == 2
    assert set(summary["bytes"]) == set(CODECS)
    assert 4 * 65_000 < summary["bytes"]["fp32"] < 4 * 65_000 + 500
    assert 2 * 65_000 < summary["bytes"]["bf16"] < 2 * 65_000 + 500
    assert 65_000 < summary["bytes"]["int8-delta"] < summary["bytes"]["int8-delta-row"] < 65_000 + 8 * 1000 + 500
