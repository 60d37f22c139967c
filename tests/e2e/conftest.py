"""Shared by the end-to-end federation tests: the `zk0` command as a subprocess, two datasets recorded once
per session with `zk0 record --sim` (different tasks), a server config small enough for minutes-long runs
(few local steps and evaluation samples; the learning-rate schedule is the shipped one), and one federation
run with drill nodes whose results several tests read."""

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

# The drill nodes of the shared fleet run.
FLEET_DRILLS = ("nan", "stats-nan", "inflate-examples", "huge-norm", "stale-base")


@pytest.fixture(scope="session")
def drill_fleet(tmp_path_factory, datasets, fast_config):
    """One `zk0 fleet local` run shared by the tests that need a federation's results: 3 rounds of the tiny model,
    SuperNodes `red` and `blue` plus one drill node per kind on red's data. Returns (run dir, its result)."""
    import time

    run = tmp_path_factory.mktemp("drill-fleet") / "run"
    drills = [arg for kind in FLEET_DRILLS for arg in ("--drill-corrupt-node", kind)]
    started = time.monotonic()
    result = run_zk0("fleet", "local", "--dataset", str(datasets[0]), "--dataset", str(datasets[1]), "--rounds", "3",
                     "--out", str(run), "--model", "tiny", "--config", str(fast_config), *drills,
                     "--timeout", "2400", timeout=2700)
    print(f"fleet run with {2 + len(FLEET_DRILLS)} SuperNodes: {time.monotonic() - started:.0f} s")
    return run, result
