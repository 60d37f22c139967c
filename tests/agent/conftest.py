"""Fixtures for recorder tests: simulated arms as real `zk0 sim arm` processes, and a dataset writer process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from zk0.agent.record import CAPTURE_TIME

FPS = 30
JOINTS = ["shoulder_pan.pos", "shoulder_lift.pos", "elbow_flex.pos", "wrist_flex.pos", "wrist_roll.pos", "gripper.pos"]
# The synthetic dataset shape every store test and the writer process use: 6-dim state/action, one small video.
FEATURES = {
    "action": {"dtype": "float32", "shape": (6,), "names": JOINTS},
    "observation.state": {"dtype": "float32", "shape": (6,), "names": JOINTS},
    "observation.images.front": {"dtype": "video", "shape": (48, 64, 3), "names": ["height", "width", "channels"]},
    CAPTURE_TIME: {"dtype": "float32", "shape": (1,), "names": None},
}

# A real writer process: synthetic frames (6-dim state/action, one small video stream) through DatasetStore,
# episode by episode, with $ZK0_FAULT selecting where it SIGKILLs itself.
WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import numpy as np
    from zk0.agent.dataset_commit import DatasetIdentity, EpisodeMeta
    from zk0.agent.dataset_store import DatasetStore
    from zk0.agent.record import CAPTURE_TIME
    from tests.agent.conftest import FEATURES as features

    datasets_root, name, episodes, frames = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    store, _ = DatasetStore.open(datasets_root, name, features, 30, DatasetIdentity("test-host", "so101", "cafe"))
    for _ in range(episodes):
        index = store.num_episodes
        for i in range(frames):
            store.add_frame({
                "action": np.full(6, index, np.float32),
                "observation.state": np.full(6, 100 * index + i, np.float32),
                "observation.images.front": np.full((48, 64, 3), (40 * index + i) % 255, np.uint8),
                CAPTURE_TIME: np.array([i / 30], np.float32),
                "task": f"task {index % 2}",
            })
        print(f"frames {index}", flush=True)
        store.commit_episode(EpisodeMeta(index, frames, f"task {index % 2}", time.time(), 30.0, 0, 0.5, False, "cafe", seed=index, success=index % 2 == 0))
        print(f"committed {index}", flush=True)
    store.close()
    """
)


def run_writer(datasets_root: Path, name: str, episodes: int, frames: int = 20, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("ZK0_FAULT", None)
    if fault:
        env["ZK0_FAULT"] = fault
    return subprocess.run(
        [sys.executable, "-c", WRITER, str(datasets_root), name, str(episodes), str(frames)],
        env=env, capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[2],
    )


def _spawn_arm(role: str, calibration_dir: Path) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "zk0.cli", "sim", "arm", "--role", role, "--print-port",
         "--calibration-dir", str(calibration_dir), "--id", f"sim_{role}"],
        stdout=subprocess.PIPE, text=True,
    )
    port = process.stdout.readline().strip()
    assert port.startswith("/dev/"), f"zk0 sim arm printed {port!r}"
    return process, port


@pytest.fixture
def sim_arms_config(tmp_path: Path) -> Iterator[Path]:
    """An agent config file whose follower and leader are simulated arms on real ptys (no cameras)."""
    calibration = tmp_path / "calibration"
    follower, follower_port = _spawn_arm("follower", calibration)
    leader, leader_port = _spawn_arm("leader", calibration)
    config = tmp_path / "agent.yaml"
    config.write_text(textwrap.dedent(f"""
        host_id: test-host
        robot_type: so101
        follower: {{port: {follower_port}, id: sim_follower, calibration_dir: {calibration}}}
        leader: {{port: {leader_port}, id: sim_leader, calibration_dir: {calibration}}}
        cameras: []
        datasets_root: {tmp_path / 'datasets'}
        record: {{fps: {FPS}, episode_time_s: 1.0, reset_time_s: 0.2, min_free_disk_mb: 1}}
    """))
    yield config
    for process in (follower, leader):
        process.terminate()
        process.wait(timeout=10)
