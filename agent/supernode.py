"""The agent's federation processes: its warm learning worker and its Flower SuperNode, kept running.

`flower-supernode` is built from the agent config (zk0.agent.node) with two additions to its node config: the
agent's control address (its ClientApps ask the agent for training leases) and the learning worker's address
(they hand statistics, training and evaluation to the worker, which keeps the model and frames warm between
Flower's per-message ClientApp processes: zk0.agent.learning_worker). The worker starts first and the SuperNode
once the worker answers, so no round reaches a node whose worker is still importing torch.

Each process is the agent's child in its own process group (stopped with everything below it); when one exits
(or cannot be started) what is left of its group is ended and it is restarted after a backoff that doubles from
1 s to 60 s and resets once a run has lasted 5 minutes, so a SuperLink that is down for an hour costs a few dozen
restarts, not thousands. Each start and exit is an event (`supernode`, `learn-worker`); `zk0ctl status --json`
shows each process under `federation` (running, pid, restarts, how the last run ended, its log).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zk0.agent.daemon_jobs import without_systemd
from zk0.common.flower_process import LaunchError, ManagedProcess, flower_env

log = logging.getLogger("zk0.agent.supernode")
FIRST_BACKOFF_S, MAX_BACKOFF_S, STABLE_RUN_S = 1.0, 60.0, 300.0


def next_backoff(previous_s: float, ran_s: float) -> float:
    """Seconds to wait before the next start, after a run of `ran_s` seconds that followed a `previous_s` wait."""
    if ran_s >= STABLE_RUN_S:
        return FIRST_BACKOFF_S
    return min(MAX_BACKOFF_S, max(FIRST_BACKOFF_S, 2 * previous_s))


class Supervised:
    """One child process restarted with backoff; `start` makes it (a ManagedProcess). `describe` is its state for
    `zk0ctl status`, `on_event(name, status=...)` reports each start and exit (the agent's event stream)."""

    def __init__(self, name: str, start: Callable[[], ManagedProcess], on_event: Callable[..., object]) -> None:
        self.name, self._start, self._on_event = name, start, on_event
        self.process: ManagedProcess | None = None
        self._started_at = self._backoff_s = self._next_start = 0.0
        self.restarts = 0
        self.last_exit: str | None = None  # how the last run ended, for the operator
        self.log_path: Path | None = None  # kept while it waits to restart: that is when its log is read

    def tick(self, now: float, may_start: bool = True) -> None:
        if self.process is not None and not self.process.running():
            code, ran_s = self.process.process.returncode, now - self._started_at
            # what it started in its group (SuperExec, ClientApps) would otherwise outlive it, beside the next one
            self.process.stop()
            self.process = None
            self._retry_later(now, ran_s, f"exited with {code} after {ran_s:.0f} s", status="exited", returncode=code)
        if self.process is None and may_start and now >= self._next_start:
            try:
                self.process = self._start()
            except (OSError, LaunchError) as error:  # e.g. flower-supernode missing: retried, not a loop crash
                self._retry_later(now, 0.0, f"did not start: {error}", status="failed", error=str(error))
                return
            self._started_at, self.log_path = now, self.process.log_path
            self.restarts += self._next_start > 0
            self._on_event(self.name, status="started", pid=self.process.process.pid)

    def _retry_later(self, now: float, ran_s: float, what: str, **event: object) -> None:
        self._backoff_s = next_backoff(self._backoff_s, ran_s)
        self._next_start, self.last_exit = now + self._backoff_s, what
        log.warning("%s %s; restart in %.0f s", self.name, what, self._backoff_s)
        self._on_event(self.name, restart_in_s=self._backoff_s, **event)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.running()

    def describe(self) -> dict[str, Any]:
        return {"running": self.running, "pid": self.process.process.pid if self.running else None,
                "restarts": self.restarts, "last_exit": self.last_exit,
                "log": str(self.log_path) if self.log_path else None}

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None


class FederationProcesses:
    """The learning worker and the SuperNode of an agent whose config has a `federation:` section."""

    def __init__(self, config: Any, agent_address: str, worker_address: str, logs: Path,
                 on_event: Callable[..., object]) -> None:
        from zk0.agent.node import node_settings, spawn_learn_worker, supernode_command, with_learn_worker

        settings = with_learn_worker(dataclasses.replace(node_settings(config), agent_address=agent_address),
                                     worker_address)
        self.worker_address = worker_address
        self.worker = Supervised(
            "learn-worker", lambda: spawn_learn_worker(settings, worker_address, logs / "learn-worker.log"), on_event)
        self.supernode = Supervised("supernode", lambda: ManagedProcess(
            "supernode", supernode_command(settings), logs / "supernode.log", env=without_systemd(flower_env())),
            on_event)
        self._worker_ready = False

    def tick(self, now: float | None = None) -> None:
        from zk0.agent.worker_client import ping

        now = time.monotonic() if now is None else now
        self.worker.tick(now)
        if not self.worker.running:
            self._worker_ready = False
        elif not self._worker_ready:
            self._worker_ready = ping(self.worker_address, timeout_s=0.05) is not None
        self.supernode.tick(now, may_start=self._worker_ready)

    def describe(self) -> dict[str, Any]:
        return {"learn_worker": {**self.worker.describe(), "ready": self._worker_ready},
                "supernode": self.supernode.describe()}

    def stop(self) -> None:
        self.supernode.stop()
        self.worker.stop()
