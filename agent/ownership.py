"""One owner for the robot: a running agent holds `<runtime-dir>/robot.lock`; the standalone commands that drive
the arm (`zk0 record`, `zk0 rollout`, `zk0 validate` without --sim) refuse to start while it does.

An flock, not a PID file: the kernel drops it when the agent dies, however it dies, so a stale file never
locks the robot out. The agent's own jobs run those same commands with `ZK0_AGENT_JOB=1` in their environment
and skip the check (the agent started them, one at a time).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

AGENT_JOB_ENV = "ZK0_AGENT_JOB"
RUNTIME_DIR_ENV = "ZK0_RUNTIME_DIR"
DEFAULT_RUNTIME_DIR = Path("/run/zk0")
LOCK_NAME = "robot.lock"


class RobotOwned(RuntimeError):
    """Another process (the agent) owns the robot."""


def runtime_dir() -> Path:
    """Where the agent keeps its sockets and lock: $ZK0_RUNTIME_DIR, else /run/zk0."""
    return Path(os.environ.get(RUNTIME_DIR_ENV) or DEFAULT_RUNTIME_DIR)


class RobotLock:
    """The agent's claim on the robot, held from `acquire` until `release` or the process ends."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise RobotOwned(f"another zk0 agent{holder} already owns the robot ({self.path})") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


def refuse_if_agent_owns_robot(command: str, directory: Path | None = None) -> None:
    """RobotOwned when an agent holds the robot and this process is not one of its jobs."""
    if os.environ.get(AGENT_JOB_ENV) == "1":
        return
    path = (directory or runtime_dir()) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RobotOwned(f"the zk0 agent{_holder(fd)} owns the robot; ask it instead "
                         f"(zk0ctl {command} ...), or stop it (systemctl stop zk0-agent)") from None
    finally:
        os.close(fd)
