"""`zk0 agent --sim` as systemd runs it: a subprocess with NOTIFY_SOCKET at a test datagram socket.

- READY arrives once the sockets are bound and the simulated rig's arms and cameras answered the agent's check;
  WATCHDOG pings keep coming at half the configured WatchdogSec; STATUS follows the state through a recording
  session driven by `zk0ctl` only (2 episodes); a standalone `zk0 record` refuses while the agent owns the robot;
  SIGHUP with a broken config keeps the old one, with a valid changed one takes it (the next recording goes to the
  new datasets root); SIGTERM in the middle of that recording's episode: the episode is committed as far as it got,
  the dataset loads, no process of the job is left, STOPPING, exit 0.
- The drill `ZK0_AGENT_DRILL=hang-loop-after:S` hangs the agent's loop: the pings stop.
"""

from __future__ import annotations

import grp
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.agent.notify_socket import NotifyListener, notify_socket  # noqa: F401 (the fixture)
from tests.e2e.conftest import REPO, run_zk0
from zk0.agent.control import SOCKET_GROUP

pytestmark = pytest.mark.slow
WATCHDOG_S = 2.0


def start_agent(tmp_path: Path, listener: NotifyListener, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "zk0.cli", "agent", "--sim", "--state-dir", str(tmp_path / "state"),
         "--runtime-dir", str(tmp_path / "run"), *extra],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**listener.environ(watchdog_s=WATCHDOG_S, base=os.environ), **(env or {})},
    )


def zk0ctl(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys; from zk0.agent.ctl import main; sys.exit(main())",
                           "--runtime-dir", str(tmp_path / "run"), *args],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


def test_agent_under_systemd_records_through_zk0ctl_reloads_and_stops(tmp_path: Path, notify_socket: NotifyListener) -> None:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    config = tmp_path / "agent.yaml"
    good = (REPO / "configs" / "agent.yaml").read_text().replace(
        "datasets_root: /var/lib/zk0/datasets", f"datasets_root: {tmp_path / 'state' / 'datasets'}")
    config.write_text(good)
    agent = start_agent(tmp_path, notify_socket, "--config", str(config))
    try:
        notify_socket.wait_for("READY", pid=agent.pid, timeout_s=120)
        assert zk0ctl(tmp_path, "status").stdout.strip() == "idle"
        made = os.stat(tmp_path / "run")  # the agent made its runtime dir: its user and the zk0 group only
        zk0_gid = next((g.gr_gid for g in grp.getgrall() if g.gr_name == SOCKET_GROUP), os.getegid())
        assert (stat.S_IMODE(made.st_mode), made.st_gid) == (0o750, zk0_gid)
        refused = standalone_record(tmp_path, config)
        assert refused.returncode == 2 and "owns the robot" in refused.stderr, refused.stderr

        started = zk0ctl(tmp_path, "record", "start", "--dataset", "demo", "--task", "pick the red cube",
                         "--episodes", "2", "--episode-time-s", "2")
        assert started.returncode == 0, started.stderr
        assert zk0ctl(tmp_path, "rollout", "start", "--task", "pick the red cube").returncode == 2  # robot busy
        deadline = time.monotonic() + 300
        while zk0ctl(tmp_path, "status").stdout.strip() != "idle":
            assert agent.poll() is None and time.monotonic() < deadline
            time.sleep(1.0)
        status = json.loads(zk0ctl(tmp_path, "status", "--json").stdout)
        assert status["reason"] == "session complete", status
        commit = json.loads((tmp_path / "state" / "datasets" / "demo" / "meta" / "zk0.json").read_text())
        assert len(commit["episodes"]) == 2

        states = [s.split(":")[0] for s in notify_socket.values("STATUS", pid=agent.pid)]
        assert "recording" in states and states[-1] == "idle", states
        pings = notify_socket.times("WATCHDOG", pid=agent.pid)
        gaps = [b - a for a, b in zip(pings, pings[1:])]
        assert len(pings) >= 10 and max(gaps) < WATCHDOG_S, gaps  # half the WatchdogSec, never a whole one

        config.write_text("robot_type: so101\nfollower: {port: 1}\n")  # broken: refused, the old one kept
        agent.send_signal(signal.SIGHUP)
        notify_socket.wait_for("RELOADING", pid=agent.pid, timeout_s=30)
        time.sleep(1.0)
        assert zk0ctl(tmp_path, "status").stdout.strip() == "idle"

        moved = tmp_path / "state" / "datasets-2"  # valid and changed: taken
        config.write_text(good.replace(str(tmp_path / "state" / "datasets"), str(moved)))
        agent.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while json.loads(zk0ctl(tmp_path, "status", "--json").stdout)["datasets_root"] != str(moved):
            assert agent.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        job = record_until_mid_episode(tmp_path)
    finally:
        agent.send_signal(signal.SIGTERM)  # with the job above: in the middle of its first episode
        output, _ = agent.communicate(timeout=120)
    assert agent.returncode == 0, output
    assert "robot and cameras answer" in output  # READY came after the check (zk0.agent.readiness)
    assert "config reload refused, keeping the running config" in output and "config reloaded" in output
    notify_socket.wait_for("STOPPING", pid=agent.pid, timeout_s=5)
    episodes = json.loads((moved / "demo" / "meta" / "zk0.json").read_text())["episodes"]
    assert len(episodes) == 1 and 0 < episodes[0]["length"] < 60 * 30, episodes  # as far as it got of 60 s at 30 fps
    dataset = LeRobotDataset("local/demo", root=moved / "demo")
    assert dataset.num_episodes == 1 and dataset.num_frames == episodes[0]["length"]
    last = dataset[dataset.num_frames - 1]  # its videos hold every frame: the last one decodes
    assert last["observation.images.front"].shape[0] == 3 and last["observation.images.wrist"].shape[0] == 3
    assert_gone(job)
    config.write_text(good)
    after = standalone_record(tmp_path, config)  # no agent: it gets as far as the missing serial port
    assert after.returncode == 2 and "owns the robot" not in after.stderr and "not found" in after.stderr, after.stderr


def record_until_mid_episode(tmp_path: Path) -> dict:
    """Start a long recording through zk0ctl and return the agent's status of its job once the job's own status
    (its control socket) shows frames of the first episode."""
    from zk0.agent.control import request

    assert zk0ctl(tmp_path, "record", "start", "--dataset", "demo", "--task", "pick the red cube", "--episodes", "3",
                  "--episode-time-s", "60").returncode == 0
    job = json.loads(zk0ctl(tmp_path, "status", "--json").stdout)["job"]
    deadline = time.monotonic() + 120
    while True:
        assert time.monotonic() < deadline, job
        try:
            progress = request(f"ipc://{tmp_path / 'run' / 'job.sock'}", "status", 2.0)
        except TimeoutError:  # the job's control socket is not up yet
            continue
        if progress.get("episode") == 0 and progress.get("frames", 0) > 0:
            return job
        time.sleep(0.2)


def assert_gone(job: dict) -> None:
    """No process of the job's group (the recorder, its dataset writer) is left once the agent exited."""
    deadline = time.monotonic() + 10
    while True:
        try:
            os.killpg(job["pid"], 0)
        except ProcessLookupError:
            return
        assert time.monotonic() < deadline, f"the {job['kind']} job's processes outlived the agent"
        time.sleep(0.2)


def standalone_record(tmp_path: Path, config: Path) -> subprocess.CompletedProcess:
    return run_zk0("record", "--config", str(config), "--dataset", "x", "--task", "pick the red cube", "--episodes",
                   "1", timeout=120, env={"ZK0_RUNTIME_DIR": str(tmp_path / "run")})


def test_a_hung_agent_loop_stops_the_watchdog_pings(tmp_path: Path, notify_socket: NotifyListener) -> None:
    agent = start_agent(tmp_path, notify_socket, env={"ZK0_AGENT_DRILL": "hang-loop-after:3"})
    try:
        notify_socket.wait_for("READY", pid=agent.pid, timeout_s=120)
        ready_at = notify_socket.times("READY", pid=agent.pid)[0]
        time.sleep(3 + 3 * WATCHDOG_S)
        pings = notify_socket.times("WATCHDOG", pid=agent.pid)
        assert pings and all(t < ready_at + 3 + LOOP_SLACK_S for t in pings), (ready_at, pings)
        assert len(pings) >= 2  # it pinged while the loop ran
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.communicate(timeout=60)


LOOP_SLACK_S = 1.5  # the drill's clock starts before READY; one more ping may already be under way


def test_after_sigkill_mid_recording_a_restarted_agent_finds_its_dataset_and_goes_on(
        tmp_path: Path, notify_socket: NotifyListener) -> None:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    agent = start_agent(tmp_path, notify_socket)
    notify_socket.wait_for("READY", pid=agent.pid, timeout_s=120)
    assert zk0ctl(tmp_path, "record", "start", "--dataset", "demo", "--task", "pick the red cube", "--episodes", "20",
                  "--episode-time-s", "2").returncode == 0
    commit = tmp_path / "state" / "datasets" / "demo" / "meta" / "zk0.json"
    deadline = time.monotonic() + 300
    while not (commit.exists() and json.loads(commit.read_text())["episodes"]):
        assert time.monotonic() < deadline and agent.poll() is None
        time.sleep(0.5)
    job = json.loads(zk0ctl(tmp_path, "status", "--json").stdout)["job"]["pid"]
    agent.kill()  # as systemd ends the whole unit (its cgroup) when the agent dies: the job goes too
    os.killpg(job, signal.SIGKILL)
    agent.communicate(timeout=60)

    again = start_agent(tmp_path, notify_socket)
    try:
        notify_socket.wait_for("READY", pid=again.pid, timeout_s=120)
        assert zk0ctl(tmp_path, "status").stdout.strip() == "idle"
        committed = len(json.loads(commit.read_text())["episodes"])
        assert zk0ctl(tmp_path, "record", "start", "--dataset", "demo", "--task", "pick the red cube", "--episodes",
                      "1", "--episode-time-s", "2").returncode == 0
        deadline = time.monotonic() + 300
        while (status := json.loads(zk0ctl(tmp_path, "status", "--json").stdout))["state"] != "idle":
            assert time.monotonic() < deadline and again.poll() is None
            time.sleep(1.0)
        assert status["reason"] == "session complete", status
        dataset = LeRobotDataset("local/demo", root=tmp_path / "state" / "datasets" / "demo")
        assert dataset.num_episodes == committed + 1 == len(json.loads(commit.read_text())["episodes"])
    finally:
        again.send_signal(signal.SIGTERM)
        again.communicate(timeout=120)
    assert again.returncode == 0
