"""The agent's Flower SuperNode: `flower-supernode` built from the agent config (zk0.agent.node), kept running.

The SuperNode is the agent's child (its own process group, stopped with every ClientApp below it); when it
exits the agent restarts it after a backoff that doubles from 1 s to 60 s and resets once a run has lasted 5
minutes, so a SuperLink that is down for an hour costs a few dozen restarts, not thousands. Its ClientApps
ask the agent for training leases at the agent's control address (node config `agent-address`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zk0.agent.daemon_jobs import without_systemd
from zk0.common.flower_process import ManagedProcess, flower_env

log = logging.getLogger("zk0.agent.supernode")
FIRST_BACKOFF_S, MAX_BACKOFF_S, STABLE_RUN_S = 1.0, 60.0, 300.0


def next_backoff(previous_s: float, ran_s: float) -> float:
    """Seconds to wait before the next start, after a run of `ran_s` seconds that followed a `previous_s` wait."""
    if ran_s >= STABLE_RUN_S:
        return FIRST_BACKOFF_S
    return min(MAX_BACKOFF_S, max(FIRST_BACKOFF_S, 2 * previous_s))


class SupernodeSupervisor:
    def __init__(self, config: Any, agent_address: str, log_path: Path,
                 on_event: Callable[..., object], extra_node_config: dict | None = None) -> None:
        from zk0.agent.node import node_settings, supernode_command

        settings = dataclasses.replace(node_settings(config), agent_address=agent_address,
                                       extra_node_config=dict(extra_node_config or {}))
        self.command = supernode_command(settings)
        self.log_path = log_path
        self._on_event = on_event
        self._process: ManagedProcess | None = None
        self._started_at = 0.0
        self._backoff_s = 0.0
        self._next_start = 0.0
        self.restarts = 0

    def tick(self, now: float | None = None) -> None:
        """Start the SuperNode when it is due; notice when it has exited and schedule its restart."""
        now = time.monotonic() if now is None else now
        if self._process is not None and not self._process.running():
            code = self._process.process.returncode
            ran_s = now - self._started_at
            self._backoff_s = next_backoff(self._backoff_s, ran_s)
            self._next_start = now + self._backoff_s
            self._process = None
            log.warning("flower-supernode exited with %s after %.0f s; restart in %.0f s", code, ran_s, self._backoff_s)
            self._on_event("supernode", status="exited", returncode=code, restart_in_s=self._backoff_s)
        if self._process is None and now >= self._next_start:
            self._process = ManagedProcess("supernode", self.command, self.log_path, env=without_systemd(flower_env()))
            self._started_at = now
            self.restarts += self._next_start > 0
            self._on_event("supernode", status="started", pid=self._process.process.pid)

    def describe(self) -> dict[str, Any]:
        running = self._process is not None and self._process.running()
        return {"running": running, "pid": self._process.process.pid if running else None, "restarts": self.restarts,
                "log": str(self.log_path)}

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop()
            self._process = None
