"""Flower process plumbing that the server, the nodes and the compositions above them share.

Flower 1.41's deployment engine is a set of command-line processes (`flower-superlink`,
`flower-supernode`, `flwr`) that start sibling tools by name; these helpers find those tools in the
environment zk0 runs in, run them as managed child processes and stop them with everything they started.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path


class LaunchError(RuntimeError):
    """A Flower process or command failed; the message is one line for the user."""


def flower_tool(name: str) -> str:
    """Path of a Flower console script from the environment zk0 runs in."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise LaunchError(f"{name} not found: is flwr installed in this environment?")
    return found


def flower_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for Flower processes: they start sibling tools (flower-superexec,
    flwr-serverapp, flwr-clientapp) by name, so this environment's bin directory leads PATH."""
    env = {**os.environ, **(extra or {})}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise LaunchError(f"nothing is listening on {host}:{port} after {timeout_s:.0f} s")


class ManagedProcess:
    """A child process in its own session, logging to a file, stopped with its whole group.

    Flower's SuperLink and SuperNode start SuperExec and app processes of their own; signalling
    the group takes them down together instead of leaving orphans behind.
    """

    def __init__(self, name: str, command: list[str], log_path: Path, env: Mapping[str, str] | None = None):
        self.name = name
        self.command = command
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env=dict(env) if env is not None else flower_env(),
            )

    def running(self) -> bool:
        return self.process.poll() is None

    def descendants(self) -> list[int]:
        """Every live process below this one, in any session (SuperExec detaches its children)."""
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        found, frontier = [], [self.process.pid]
        while frontier:
            kids = children.get(frontier.pop(), [])
            found += kids
            frontier += kids
        return found

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop the process, its group, and every descendant (SuperExec, ServerApp, ClientApp processes)."""
        below = self.descendants()
        if self.process.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.process.wait()
        # Children that outlived the leader (SuperExec, app processes) are still in the group or detached.
        self._signal_group(signal.SIGKILL)
        for pid in below:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _signal_group(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
