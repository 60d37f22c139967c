"""`zk0 node --learn-worker`: the worker's address and command, the node config that points ClientApps at it,
and the supervision that stops both processes when either exits."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.server.test_node_command import AGENT_YAML, REPO, _write
from zk0.agent import node
from zk0.agent.learning_worker import worker_command
from zk0.common.flower_process import ManagedProcess
from zk0.common.typed_yaml import ConfigError


def test_the_worker_listens_beside_the_policy_store_and_serves_only_the_nodes_data(tmp_path: Path) -> None:
    settings = node.load_node_settings(_write(tmp_path, AGENT_YAML))
    assert node.default_worker_address(settings) == "ipc:///var/lib/zk0/learn-worker.sock"
    relaying = node.with_learn_worker(settings, "ipc:///run/zk0/learn.sock")
    assert relaying.node_config()["learn-worker"] == "ipc:///run/zk0/learn.sock"
    assert "learn-worker" not in settings.node_config()  # without the option, nodes run exactly as before
    assert worker_command("ipc:///run/zk0/learn.sock", settings.datasets, settings.policy_store)[1:] == [
        "-m", "zk0.cli", "learn-worker", "--socket", "ipc:///run/zk0/learn.sock", "--stop-grace-s", "120.0",
        "--datasets", "/data/pick", "/abs/push", "--policy-store", "/var/lib/zk0/policies"]
    deep = node.NodeSettings(superlink="x:1", datasets=[], policy_store=Path("/" + "d" * 120) / "policies")
    with pytest.raises(ConfigError, match="too long for a unix socket"):
        node.default_worker_address(deep)


def test_check_shows_the_worker_address_in_the_node_config(tmp_path: Path) -> None:
    checked = subprocess.run([sys.executable, "-m", "zk0.cli", "node", "--config", str(_write(tmp_path, AGENT_YAML)),
                              "--check", "--learn-worker"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert checked.returncode == 0, checked.stderr
    assert "learn-worker = 'ipc:///var/lib/zk0/learn-worker.sock'" in checked.stdout
    assert 'learn-worker="ipc:///var/lib/zk0/learn-worker.sock"' in checked.stdout  # in --node-config


def test_supervision_stops_the_other_process_when_one_exits(tmp_path: Path) -> None:
    long = ManagedProcess("learn-worker", [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "a.log")
    short = ManagedProcess("flower-supernode", [sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "b.log")
    started = time.monotonic()
    assert node.supervise([long, short], threading.Event(), poll_s=0.05) == 1
    assert not long.running() and time.monotonic() - started < 10


def test_supervision_ends_cleanly_when_asked(tmp_path: Path) -> None:
    child = ManagedProcess("learn-worker", [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "a.log")
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    assert node.supervise([child], stop, poll_s=0.05) == 0
    assert not child.running()
