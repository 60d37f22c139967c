"""Model-update exchange: trainable tensors encoded into one self-checking payload.

Only the trainable tensors travel (SmolVLA with a frozen VLM: the action expert and its projections). A payload
is one `bytes` object:

    b"ZK0U" | version u8 | header_len u32 | body_len u64 | header (JSON) | body | SHA-256 of all before it

The header names the codec and lists every tensor's key, shape and dtype (and, for delta codecs, the SHA-256 of
the round's global the delta was taken against); the body holds, per tensor in header order, its float32
scales (int8 codecs) followed by its encoded values. The receiver checks length, checksum, header, the expected
keys / shapes / dtypes and the base digest, decodes every tensor into new memory, checks that all values are
finite, and only then returns them: a bad payload raises a `CodecError` with a reason and never yields a partial update.

Codecs and their error bounds (`x` the sent tensor, `g` the round's global, `d = x - g`); all but `fp32` send `d`:
- `fp32`: exact for float32 tensors.
- `bf16`: round-to-nearest bfloat16 of `d`, |error| <= |d| * 2**-8 per element (plus the float32 rounding of
  `g + d`). Rounding `d` rather than `x` keeps small updates: bfloat16 of a weight near 0.03 moves in steps of
  ~1.2e-4, so a local step of 1e-5 would vanish entirely.
- `int8-delta`: symmetric int8 of `d` with one scale per tensor, `s = max|d| / 127`; |error| <= s / 2.
- `int8-delta-row`: as above with one scale per row (first dimension) of every matrix; |error| <= s_row / 2,
  which is tighter wherever rows differ in magnitude, for 4 bytes per row.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

MAGIC = b"ZK0U"
VERSION = 2  # 2: bf16 carries the delta against the global (version 1 sent bf16 of the weights)
_PREFIX = struct.Struct("<4sBIQ")  # magic, version, header length, body length
_DIGEST_BYTES = 32
FLOWER_KEY = "zk0.update"
FLOWER_STYPE = "zk0.update.v1"


class CodecError(ValueError):
    """A payload the receiver refuses; `reason` says why in one human-readable line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PayloadCorrupt(CodecError):
    """Truncated, wrongly framed or otherwise undecodable bytes."""


class ChecksumMismatch(CodecError):
    """The SHA-256 carried by the payload does not match its contents."""


class LayoutMismatch(CodecError):
    """Keys, shapes or dtypes differ from the expected tensors, or a delta was taken against another global."""


class NonFinite(CodecError):
    """Decoded values contain NaN or infinity."""


@dataclass(frozen=True)
class _Codec:
    """How one tensor's values become bytes; int8 codecs add float32 scales, one per row (or one per tensor)."""

    name: str
    is_delta: bool
    bytes_per_value: int
    per_row: bool = False

    @property
    def quantized(self) -> bool:
        return self.bytes_per_value == 1

    def scale_count(self, shape: tuple[int, ...]) -> int:
        if not self.quantized:
            return 0
        return shape[0] if self.per_row and len(shape) >= 2 else 1

    def body_size(self, shape: tuple[int, ...]) -> int:
        return 4 * self.scale_count(shape) + self.bytes_per_value * _numel(shape)

    def encode(self, values: torch.Tensor) -> bytes:
        """`values`: float32, the tensor itself or (delta codecs) its difference from the global."""
        if self.name == "fp32":
            return values.numpy().astype("<f4", copy=False).tobytes()
        if self.name == "bf16":
            return values.to(torch.bfloat16).view(torch.int16).numpy().astype("<i2", copy=False).tobytes()
        rows = values.reshape(self.scale_count(tuple(values.shape)), -1)
        scales = rows.abs().amax(dim=1) / 127.0
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        quantized = torch.round(rows / safe[:, None]).clamp_(-127, 127).to(torch.int8)
        return scales.numpy().astype("<f4").tobytes() + quantized.numpy().tobytes()

    def decode(self, buffer: memoryview, shape: tuple[int, ...]) -> torch.Tensor:
        """float32 tensor of `shape` from exactly `body_size(shape)` bytes."""
        count = _numel(shape)
        if self.name == "fp32":
            return torch.from_numpy(np.frombuffer(buffer, dtype="<f4", count=count).astype(np.float32)).reshape(shape)
        if self.name == "bf16":
            raw = torch.from_numpy(np.frombuffer(buffer, dtype="<i2", count=count).astype(np.int16))
            return raw.view(torch.bfloat16).to(torch.float32).reshape(shape)
        n_scales = self.scale_count(shape)
        scales = torch.from_numpy(np.frombuffer(buffer, dtype="<f4", count=n_scales).astype(np.float32))
        quantized = torch.from_numpy(np.frombuffer(buffer, dtype=np.int8, count=count, offset=4 * n_scales).copy())
        return (quantized.reshape(n_scales, -1).to(torch.float32) * scales[:, None]).reshape(shape)


CODECS: dict[str, _Codec] = {
    c.name: c
    for c in (
        _Codec("fp32", is_delta=False, bytes_per_value=4),
        _Codec("bf16", is_delta=True, bytes_per_value=2),
        _Codec("int8-delta", is_delta=True, bytes_per_value=1),
        _Codec("int8-delta-row", is_delta=True, bytes_per_value=1, per_row=True),
    )
}


def _numel(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64))


def _codec(name: str) -> _Codec:
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; choose one of {', '.join(CODECS)}")
    return CODECS[name]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """Digest of keys, dtypes, shapes and raw bytes: identifies the round's global a delta refers to."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        digest.update(json.dumps([key, _dtype_name(t.dtype), list(t.shape)]).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _header(codec: _Codec, tensors: Mapping[str, Any], base_sha256: str | None) -> bytes:
    """Pure function of names, shapes and dtypes, so sizes can be computed from shapes alone."""
    entries = [
        {"key": key, "shape": list(tensors[key].shape), "dtype": _dtype_name(tensors[key].dtype)}
        for key in sorted(tensors)
    ]
    header: dict[str, Any] = {"codec": codec.name, "tensors": entries}
    if base_sha256 is not None:
        header["base_sha256"] = base_sha256
    return json.dumps(header, separators=(",", ":")).encode()


def _check_layout(names: list[str], shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str],
                  expected: Mapping[str, torch.Tensor], what: str) -> None:
    missing = sorted(set(expected) - set(names))
    extra = sorted(set(names) - set(expected))
    if missing or extra:
        parts = [f"missing {missing[:3]}" if missing else "", f"unexpected {extra[:3]}" if extra else ""]
        raise LayoutMismatch(f"{what} keys differ from the expected tensors: {' '.join(p for p in parts if p)}")
    for key in names:
        want = expected[key]
        if tuple(want.shape) != shapes[key]:
            raise LayoutMismatch(f"{what} tensor {key!r} has shape {shapes[key]}, expected {tuple(want.shape)}")
        if _dtype_name(want.dtype) != dtypes[key]:
            raise LayoutMismatch(f"{what} tensor {key!r} has dtype {dtypes[key]}, expected {_dtype_name(want.dtype)}")


def encode(tensors: Mapping[str, torch.Tensor], codec: str, base: Mapping[str, torch.Tensor] | None = None) -> bytes:
    """Payload carrying `tensors` (the trainable tensors after local training).

    Delta codecs need `base`, the round's global of the same keys; the payload records its digest.
    """
    spec = _codec(codec)
    if not tensors:
        raise ValueError("nothing to encode: no tensors given")
    prepared: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        values = t.detach().to("cpu", torch.float32)
        if not torch.isfinite(values).all():
            raise NonFinite(f"tensor {key!r} contains NaN or infinity; refusing to send it")
        prepared[key] = values
    base_sha256 = None
    if spec.is_delta:
        if base is None:
            raise ValueError(f"codec {codec} encodes a delta and needs the round's global as base")
        _check_layout(sorted(tensors), {k: tuple(t.shape) for k, t in tensors.items()},
                      {k: _dtype_name(t.dtype) for k, t in tensors.items()}, base, "update")
        base_sha256 = tensors_sha256(base)
        prepared = {k: v - base[k].detach().to("cpu", torch.float32) for k, v in prepared.items()}
    header = _header(spec, tensors, base_sha256)
    body = b"".join(spec.encode(prepared[key].contiguous()) for key in sorted(prepared))
    framed = _PREFIX.pack(MAGIC, VERSION, len(header), len(body)) + header + body
    return framed + hashlib.sha256(framed).digest()


def _parse_header(payload: bytes) -> tuple[dict[str, Any], memoryview]:
    if len(payload) < _PREFIX.size + _DIGEST_BYTES:
        raise PayloadCorrupt(f"payload of {len(payload)} bytes is too short to be an update")
    magic, version, header_len, body_len = _PREFIX.unpack_from(payload)
    if magic != MAGIC:
        raise PayloadCorrupt("payload does not start with the zk0 update marker")
    if version != VERSION:
        raise PayloadCorrupt(f"payload format version {version} is not supported (expected {VERSION})")
    expected_len = _PREFIX.size + header_len + body_len + _DIGEST_BYTES
    if len(payload) != expected_len:
        raise PayloadCorrupt(f"payload is {len(payload)} bytes, its framing says {expected_len} (truncated or padded)")
    if hashlib.sha256(memoryview(payload)[:-_DIGEST_BYTES]).digest() != payload[-_DIGEST_BYTES:]:
        raise ChecksumMismatch("payload SHA-256 does not match its contents")
    try:
        header = json.loads(payload[_PREFIX.size:_PREFIX.size + header_len])
        _codec(header["codec"])
        for entry in header["tensors"]:
            entry["shape"] = tuple(int(n) for n in entry["shape"])
            str(entry["key"]), str(entry["dtype"])
    except (ValueError, KeyError, TypeError) as exc:
        raise PayloadCorrupt(f"payload header is unreadable: {exc}") from exc
    body = memoryview(payload)[_PREFIX.size + header_len:-_DIGEST_BYTES]
    return header, body


def decode(payload: bytes, expected: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """New tensors carried by `payload`, validated against `expected` (the round's global of the same keys).

    Raises a `CodecError` subclass with a reason for anything that is not a complete, intact, finite update of
    exactly the expected tensors; nothing is returned (or modified) in that case.
    """
    header, body = _parse_header(bytes(payload))
    spec = _codec(header["codec"])
    entries = header["tensors"]
    names = [e["key"] for e in entries]
    shapes = {e["key"]: e["shape"] for e in entries}
    dtypes = {e["key"]: e["dtype"] for e in entries}
    if len(set(names)) != len(names):
        raise PayloadCorrupt("payload header lists a tensor twice")
    _check_layout(names, shapes, dtypes, expected, "payload")
    if spec.is_delta and header.get("base_sha256") != tensors_sha256(expected):
        raise LayoutMismatch("payload is a delta against a different global than this round's")
    needed = sum(spec.body_size(shapes[k]) for k in names)
    if needed != len(body):
        raise PayloadCorrupt(f"payload body is {len(body)} bytes, its header describes {needed}")

    decoded: dict[str, torch.Tensor] = {}
    offset = 0
    for key in names:
        size = spec.body_size(shapes[key])
        values = spec.decode(body[offset:offset + size], shapes[key])
        offset += size
        if spec.is_delta:
            values = expected[key].detach().to("cpu", torch.float32) + values
        if not torch.isfinite(values).all():
            raise NonFinite(f"tensor {key!r} decodes to NaN or infinity")
        decoded[key] = values.to(expected[key].dtype)
    return decoded


def payload_size(tensors: Mapping[str, Any], codec: str) -> int:
    """Exact payload bytes for tensors of these shapes/dtypes (works for 'meta'-device tensors)."""
    spec = _codec(codec)
    placeholder = "0" * 64 if spec.is_delta else None
    header = _header(spec, tensors, placeholder)
    body = sum(spec.body_size(tuple(tensors[k].shape)) for k in tensors)
    return _PREFIX.size + len(header) + body + _DIGEST_BYTES


def report(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Which tensors travel and how many bytes one update costs with each codec."""
    listing = {k: {"shape": list(tensors[k].shape), "dtype": _dtype_name(tensors[k].dtype)} for k in sorted(tensors)}
    return {
        "tensors": listing,
        "tensor_count": len(listing),
        "parameters": sum(_numel(tuple(t.shape)) for t in tensors.values()),
        "bytes": {name: payload_size(tensors, name) for name in CODECS},
    }


def to_array_record(payload: bytes) -> Any:
    """A Flower `ArrayRecord` carrying the payload's bytes untouched, so the SHA-256 is checked end to end."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({FLOWER_KEY: Array(dtype="uint8", shape=(len(payload),), stype=FLOWER_STYPE, data=payload)})


def from_array_record(record: Any) -> bytes:
    """The payload inside an `ArrayRecord` made by `to_array_record`; pass it to `decode`."""
    array = record.get(FLOWER_KEY) if hasattr(record, "get") else None
    if array is None:
        raise PayloadCorrupt(f"record has no {FLOWER_KEY!r} array")
    if array.stype != FLOWER_STYPE:
        raise PayloadCorrupt(f"record array has serialization {array.stype!r}, expected {FLOWER_STYPE!r}")
    return bytes(array.data)
