"""Shared by the end-to-end federation tests: the `zk0` command as a subprocess, two datasets recorded once
per session with `zk0 record --sim` (different tasks), and a server config small enough for minutes-long runs
(few local steps and evaluation samples; the learning-rate schedule is the shipped one)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FAST_CONFIG = """
training: {local_steps: 8, batch_size: 4, eval_fraction: 0.25}
evaluation: {max_samples: 16}
nodes: {round_timeout_s: 600}
"""


def run_zk0(*args: str, timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`zk0 ARGS` in a subprocess; `env` adds to (or overrides) this process's environment."""
    return subprocess.run([sys.executable, "-m", "zk0.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def datasets(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("datasets")
    for name, task in (("red", "pick_place_red"), ("blue", "push_blue_left")):
        result = run_zk0("record", "--sim", "--config", str(REPO / "configs" / "agent.yaml"), "--root", str(root),
                         "--dataset", name, "--task", task, "--episodes", "4", "--episode-time-s", "1.5",
                         "--reset-time-s", "0", "--no-progress", timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
    return [root / "red", root / "blue"]


@pytest.fixture(scope="session")
def fast_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "server.yaml"
    path.write_text(FAST_CONFIG)
    return path
