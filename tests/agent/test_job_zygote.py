"""The agent's warm job starter: jobs forked from a pre-imported zygote run `zk0 ...` in a session of their own,
with their output on the pipe the agent reads and their exit status reported back; a zygote that is not
ready (or gone) spawns nothing, so the agent starts the job fresh."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest

from zk0.agent.job_zygote import Zygote

PRELOAD = ("zk0.cli",)  # enough to run a `zk0` command; the agent's list imports lerobot (seconds)


@pytest.fixture
def zygote(tmp_path: Path):
    zygote = Zygote(tmp_path / "zygote.log", dict(os.environ), preload=PRELOAD)
    deadline = time.monotonic() + 60
    while not zygote.ready:
        assert time.monotonic() < deadline and zygote.process.poll() is None, (tmp_path / "zygote.log").read_text()
        time.sleep(0.05)
    yield zygote
    zygote.close()


def test_a_forked_job_runs_the_command_and_reports_its_status(zygote: Zygote) -> None:
    job = zygote.spawn(["agent", "--sim", "--check-config", "--state-dir", "/tmp/zk0-zygote-test"],
                       {**os.environ, "ZK0_AGENT_JOB": "1"})
    assert job is not None and job.pid != zygote.process.pid
    output = job.stdout.read()
    assert job.wait(timeout=30) == 0
    assert "robot_type: so101" in output and "/tmp/zk0-zygote-test/datasets" in output

    failing = zygote.spawn(["record", "--no-such-option"], dict(os.environ))
    assert "arguments are required" in failing.stdout.read() and failing.wait(timeout=30) == 2


def test_a_job_gets_the_environment_it_was_given_and_signals_reach_it(zygote: Zygote) -> None:
    job = zygote.spawn(["sim", "rig", "--help"], {"PATH": os.environ["PATH"], "ZK0_MARKER": "1"})
    assert job.wait(timeout=30) == 0 and "usage" in job.stdout.read()
    waiting = zygote.spawn(["sim", "rig", "--calibration-dir", "/tmp/zk0-zygote-rig"], dict(os.environ))
    time.sleep(1.0)
    assert os.getsid(waiting.pid) == waiting.pid  # a session (and process group) of its own, as the agent kills it
    waiting.send_signal(signal.SIGKILL)
    assert waiting.wait(timeout=30) == -signal.SIGKILL


def test_a_zygote_that_is_not_ready_or_gone_spawns_nothing(tmp_path: Path) -> None:
    slow = Zygote(tmp_path / "zygote.log", dict(os.environ), preload=("zk0.agent.no_such_module",))
    assert slow.spawn(["--help"], dict(os.environ)) is None  # not ready (and it never will be: it exits)
    slow.process.wait(timeout=60)
    assert slow.spawn(["--help"], dict(os.environ)) is None
    slow.close()


def test_when_the_agent_dies_its_running_jobs_are_stopped(tmp_path: Path) -> None:
    zygote = Zygote(tmp_path / "zygote.log", dict(os.environ), preload=PRELOAD)
    deadline = time.monotonic() + 60
    while not zygote.ready:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    job = zygote.spawn(["sim", "rig", "--calibration-dir", str(tmp_path / "calibration")], dict(os.environ))
    time.sleep(1.0)
    os.kill(job.pid, 0)  # running
    zygote._channel.shutdown(socket.SHUT_RDWR)  # what the kernel does to the agent's end when the agent is killed
    zygote.process.wait(timeout=60)
    with pytest.raises(ProcessLookupError):
        os.kill(job.pid, 0)  # stopped and reaped by the zygote
