"""Typed YAML configs: build frozen dataclasses from loaded YAML, one `ConfigError` line per mistake.

Shared by the agent's and the server's configs. Every error names the dotted key at fault
(`record.fps: expected int, got str 'thirty'`), so a user fixes the file without reading a traceback.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration mistake, phrased as one line naming the key at fault."""


def to_plain(value: Any) -> Any:
    """`build`'s inverse: a config as YAML-ready data (paths as text, enums as values) that builds back to it."""
    if dataclasses.is_dataclass(value):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    return value


def build(cls: type, raw: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping (None: all defaults), checking keys and value types.

    `prefix` starts every error line (e.g. the source file, "agent.yaml: "). A ValueError raised by the
    dataclass's own `__post_init__` checks becomes a ConfigError too.
    """
    return _build(cls, raw, prefix, "")


def _build(cls: type, raw: Any, prefix: str, path: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix}{path or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    dotted = f"{path}." if path else ""
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix}{dotted}{unknown[0]}: unknown key (expected one of: {', '.join(fields)})")
    values = {}
    for name, f in fields.items():
        if name in raw:
            values[name] = _convert(hints[name], raw[name], prefix, f"{dotted}{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}{dotted}{name}: missing required key")
    try:
        return cls(**values)
    except ValueError as err:
        raise ConfigError(f"{prefix}{dotted}{err}") from None


def _convert(hint: Any, value: Any, prefix: str, path: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, prefix, path)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        present = [option for option in options if option is not type(None)]
        if len(present) == 1:
            return _convert(present[0], value, prefix, path)  # its own error names the key at fault
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, prefix, path)
            except ConfigError:
                continue
        raise ConfigError(f"{prefix}{path}: expected {_describe(hint)}, got {type(value).__name__} {value!r}")
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{prefix}{path}: must be one of {', '.join(map(str, typing.get_args(hint)))}, got {value!r}")
        return value
    if origin is list:
        if isinstance(value, str):  # Flower's run config carries lists as comma-separated strings
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{prefix}{path}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(hint)
        return [_convert(item, v, prefix, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{prefix}{path}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if hint is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{prefix}{path}: expected a path string, got {type(value).__name__}")
        return Path(os.path.expanduser(str(value)))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and type(value) is not hint:
        raise ConfigError(f"{prefix}{path}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _describe(hint: Any) -> str:
    return " or ".join(getattr(a, "__name__", str(a)) for a in typing.get_args(hint) if a is not type(None))
