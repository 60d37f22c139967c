"""The agent's process supervisor (zk0.agent.supernode.Supervised) on real processes: a killed child is restarted
after its backoff, what it left in its process group goes with it, each start and exit is reported, and a
command that cannot start is retried with the same backoff instead of failing the agent's loop. The clock is
the caller's (`tick(now)`), so the backoff is checked without waiting for it."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from zk0.agent.supernode import Supervised
from zk0.common.flower_process import LaunchError, ManagedProcess

# A stand-in for flower-supernode: a leader with a child in its process group, as SuperExec is SuperNode's.
LEADER_WITH_CHILD = ["sh", "-c", "sleep 600 & exec sleep 600"]


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie nobody reaped has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except (FileNotFoundError, ProcessLookupError):
        return False


def ends(pid: int, timeout_s: float = 10.0) -> bool:
    """Whether `pid` has ended within `timeout_s` (a SIGKILLed process dies once the kernel schedules it)."""
    deadline = time.monotonic() + timeout_s
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def only_child(process: ManagedProcess, timeout_s: float = 10.0) -> int:
    """The pid of the one process `process` started, once the shell has started it."""
    deadline = time.monotonic() + timeout_s
    while not (children := process.descendants()):
        assert time.monotonic() < deadline, "the stand-in started no child"
        time.sleep(0.02)
    [child] = children
    return child


def kill(supervised: Supervised) -> int:
    """SIGKILL the supervised leader alone (as the OOM killer would) and wait for it; its pid."""
    process = supervised.process.process
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    return process.pid


def test_a_killed_process_is_restarted_after_its_backoff_and_its_state_is_reported(tmp_path: Path) -> None:
    events: list[tuple[str, dict]] = []
    supervised = Supervised("stand-in", lambda: ManagedProcess("stand-in", LEADER_WITH_CHILD, tmp_path / "stand-in.log"),
                            lambda name, **fields: events.append((name, fields)))
    try:
        supervised.tick(now=100.0)
        first = supervised.process.process.pid
        assert supervised.describe() == {"running": True, "pid": first, "restarts": 0, "last_exit": None,
                                         "log": str(tmp_path / "stand-in.log")}
        child = only_child(supervised.process)

        kill(supervised)
        supervised.tick(now=105.0)  # the exit is seen; a run of 5 s earns the first backoff, 1 s
        assert ends(child)  # ended with its leader, not left beside the next one
        assert supervised.describe() == {"running": False, "pid": None, "restarts": 0,
                                         "last_exit": "exited with -9 after 5 s", "log": str(tmp_path / "stand-in.log")}
        supervised.tick(now=105.9)
        assert supervised.process is None  # still backing off
        supervised.tick(now=106.0)
        second = supervised.process.process.pid
        assert second != first and supervised.describe()["running"] and supervised.describe()["restarts"] == 1

        kill(supervised)
        supervised.tick(now=106.5)  # a short run again: the backoff doubles
        supervised.tick(now=108.4)
        assert supervised.process is None
        supervised.tick(now=108.5)
        assert supervised.running and supervised.restarts == 2
        third = supervised.process.process.pid
    finally:
        supervised.stop()
    assert ends(third) and supervised.describe()["running"] is False
    assert events == [
        ("stand-in", {"status": "started", "pid": first}),
        ("stand-in", {"status": "exited", "returncode": -9, "restart_in_s": 1.0}),
        ("stand-in", {"status": "started", "pid": second}),
        ("stand-in", {"status": "exited", "returncode": -9, "restart_in_s": 2.0}),
        ("stand-in", {"status": "started", "pid": third}),
    ]


def test_a_command_that_cannot_start_is_retried_with_backoff(tmp_path: Path) -> None:
    events: list[tuple[str, dict]] = []
    attempts: list[int] = []

    def start() -> ManagedProcess:
        attempts.append(1)
        if len(attempts) < 3:
            raise LaunchError("flower-supernode not found: is flwr installed in this environment?")
        return ManagedProcess("stand-in", [sys.executable, "-c", "import time; time.sleep(600)"], tmp_path / "s.log")

    supervised = Supervised("supernode", start, lambda name, **fields: events.append((name, fields)))
    try:
        for now in (0.0, 0.5, 1.0, 2.9, 3.0):  # fails at 0 (retry at 1), fails at 1 (retry at 3), starts at 3
            supervised.tick(now)
        assert len(attempts) == 3 and supervised.running and supervised.restarts == 1
        assert supervised.describe()["last_exit"] == (
            "did not start: flower-supernode not found: is flwr installed in this environment?")
    finally:
        supervised.stop()
    failed = {"status": "failed", "error": "flower-supernode not found: is flwr installed in this environment?"}
    assert [fields for _, fields in events[:2]] == [{**failed, "restart_in_s": 1.0}, {**failed, "restart_in_s": 2.0}]
    assert events[2][1]["status"] == "started"


def test_the_supervisor_waits_while_it_may_not_start(tmp_path: Path) -> None:
    """The SuperNode starts only once its learning worker answers (`may_start`); until then nothing runs."""
    supervised = Supervised("supernode", lambda: ManagedProcess("s", ["sleep", "600"], tmp_path / "s.log"),
                            lambda *_, **__: None)
    try:
        supervised.tick(0.0, may_start=False)
        assert supervised.describe() == {"running": False, "pid": None, "restarts": 0, "last_exit": None, "log": None}
        supervised.tick(1.0)
        assert supervised.running and supervised.restarts == 0
    finally:
        supervised.stop()
