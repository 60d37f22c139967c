"""The running agent (`zk0 agent --sim`, its loop pinging a test NOTIFY_SOCKET) against outside input: its sockets
answer only its own group's users, and hypothesis-generated control messages (random JSON, wrong types, binary,
over the size limit, multipart) each get a reply while the agent stays up, `zk0ctl status` answers and the loop's
watchdog pings go on. The agent is estopped first, and the fuzzer never sends `clear`: no generated request can
start a job."""

from __future__ import annotations

import errno
import grp
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from tests.agent.notify_socket import NotifyListener
from tests.agent.test_control import AS_OTHER_USERS, answers_status, as_nobody, connect_errno
from tests.agent.test_daemon_fuzz import exchange, messages
from tests.e2e.conftest import REPO
from zk0.agent.control import SOCKET_GROUP, request
from zk0.agent.daemon_core import COMMANDS

pytestmark = pytest.mark.slow
# WatchdogSec: the agent pings every 2 s; a gap of 4 s is where systemd would kill it (a loaded machine may
# delay one ping by a beat, not two)
WATCHDOG_S = 4.0


@dataclass
class RunningAgent:
    process: subprocess.Popen
    runtime: Path
    notify: NotifyListener
    output: Path

    @property
    def control(self) -> str:
        return f"ipc://{self.runtime / 'agent.sock'}"

    def log_tail(self) -> str:
        return self.output.read_text(errors="replace")[-3000:]


@pytest.fixture(scope="module")
def agent(tmp_path_factory) -> Iterator[RunningAgent]:
    """One `zk0 agent --sim`, estopped once ready and its loop pinging. Its runtime dir is passable by anyone (tmp_path's parents are
    root's alone), so the sockets' own mode and group are what keep other users out."""
    root = tmp_path_factory.mktemp("agent")
    runtime = Path(tempfile.mkdtemp(prefix="zk0-run-", dir="/tmp"))
    runtime.chmod(0o711)
    with NotifyListener() as notify, open(root / "agent.log", "w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "zk0.cli", "agent", "--sim", "--state-dir", str(root / "state"),
             "--runtime-dir", str(runtime)], cwd=REPO, stdout=output, stderr=subprocess.STDOUT,
            env={**notify.environ(watchdog_s=WATCHDOG_S), "HF_HUB_OFFLINE": "1"})
        running = RunningAgent(process, runtime, notify, root / "agent.log")
        try:
            notify.wait_for("READY", pid=process.pid, timeout_s=120)
            notify.wait_for("WATCHDOG", pid=process.pid, timeout_s=WATCHDOG_S)  # its loop runs
            assert request(running.control, "estop", 30.0)["state"] == "estopped"
            yield running
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=120)
            shutil.rmtree(runtime, ignore_errors=True)
    assert process.returncode == 0, running.log_tail()


@AS_OTHER_USERS
def test_the_agents_sockets_answer_its_group_and_no_other_user(agent: RunningAgent) -> None:
    sockets = [os.stat(agent.runtime / name) for name in ("agent.sock", "events.sock")]
    assert [stat.S_IMODE(info.st_mode) for info in sockets] == [0o660, 0o660]
    # without a zk0 group on this machine the sockets keep the agent's own group (this process's)
    expected = next((g.gr_gid for g in grp.getgrall() if g.gr_name == SOCKET_GROUP), os.getegid())
    assert {info.st_gid for info in sockets} == {expected}
    group, control = sockets[0].st_gid, agent.runtime / "agent.sock"
    assert as_nobody([], lambda: connect_errno(control)) == errno.EACCES
    assert as_nobody([], lambda: connect_errno(agent.runtime / "events.sock")) == errno.EACCES
    assert as_nobody([], lambda: answers_status(agent.control, 1.0)) == 1
    assert as_nobody([group], lambda: answers_status(agent.control, 10.0)) == 0


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=messages(set(COMMANDS) - {"clear"}).filter(lambda frames: b'"clear"' not in b"".join(frames)))
def fuzz_one(control: str, frames: list[bytes]) -> None:
    exchange(control, frames, timeout_s=10.0)


def test_fuzzed_messages_never_crash_or_stall_the_running_agent(agent: RunningAgent) -> None:
    started = time.monotonic()
    fuzz_one(agent.control)
    fuzzed = time.monotonic()
    assert agent.process.poll() is None, agent.log_tail()

    # the loop went on all along, from a ping before the fuzzing to one after it, never a whole WatchdogSec apart
    # (systemd would have killed it)
    agent.notify.wait_for("WATCHDOG", pid=agent.process.pid, after_s=fuzzed, timeout_s=WATCHDOG_S)
    pings = [t for t in agent.notify.times("WATCHDOG", pid=agent.process.pid) if t >= started - WATCHDOG_S]
    gaps = [later - earlier for earlier, later in zip(pings, pings[1:])]
    assert pings[0] < started and max(gaps) < WATCHDOG_S, (started, fuzzed, pings)

    status = subprocess.run([sys.executable, "-c", "import sys; from zk0.agent.ctl import main; sys.exit(main())",
                             "status", "--json", "--runtime-dir", str(agent.runtime)],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert status.returncode == 0, status.stderr
    reply = json.loads(status.stdout)
    assert reply["state"] == "estopped" and reply["job"] is None, reply
    assert "Traceback" not in agent.output.read_text(errors="replace"), agent.log_tail()  # nothing failed, even caught
