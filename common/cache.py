"""zk0's per-user cache: `$XDG_CACHE_HOME/zk0` (default `~/.cache/zk0`), holding the VLM store, ONNX exports
and the sim base."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def zk0_cache(env: Mapping[str, str] = os.environ) -> Path:
    root = env.get("XDG_CACHE_HOME") or Path(env.get("HOME", "~")).expanduser() / ".cache"
    return Path(root) / "zk0"
