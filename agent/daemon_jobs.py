"""A robot job of the agent: `zk0 record|rollout|validate` as a child process the agent owns.

Why a child process rather than a thread of the agent: the recorder forks its dataset writer before any thread
starts (zk0.agent.writer_process) and runs its loop SCHED_FIFO; the rollout loads torch; a crash, a hung
driver or a leaked thread in one job must not take the agent (which pings systemd's watchdog and answers the
control API) down with it, and whatever a job held (serial ports, cameras, shared memory) is released when
its process ends. The job is the very command a host without the agent runs, so both paths are one code
path; `ZK0_AGENT_JOB=1` tells it the agent that owns the robot started it (zk0.agent.ownership). Jobs are
forked from a pre-imported zygote when it is ready (zk0.agent.job_zygote), else started fresh.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from zk0.agent import control
from zk0.agent.job_zygote import Zygote
from zk0.agent.ownership import AGENT_JOB_ENV

log = logging.getLogger("zk0.agent.jobs")
STOP_GRACE_S = 30.0  # a recorder finishing its episode, a rollout holding then cutting torque
# Library chatter (the AV1 encoder's banner per video, datasets' progress bars) stays in the job's log file and
# off the event stream, where operators follow episodes and verdicts.
NOISE_PREFIXES = ("Svt[", "Map:")


SYSTEMD_ONLY = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")  # the agent's own line to systemd


def without_systemd(environment: Mapping[str, str]) -> dict[str, str]:
    """An environment without the agent's systemd notification variables: a child is not the service."""
    return {key: value for key, value in environment.items() if key not in SYSTEMD_ONLY}


class Job:
    """One running job: its output goes to `log_path` and, line by line, to `on_line`; operator commands go to
    its private control address."""

    def __init__(self, kind: str, argv: list[str], control_address: str, log_path: Path,
                 on_line: Callable[[str, str], object], env: Mapping[str, str] | None = None,
                 zygote: Zygote | None = None) -> None:
        self.kind = kind
        self.argv = argv
        self.control_address = control_address
        self.log_path = log_path
        self.started_at = time.time()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("a", buffering=1)
        self._log.write(f"$ zk0 {' '.join(argv)}\n")
        self._on_line = on_line
        environment = {**without_systemd(os.environ), **(env or {}), AGENT_JOB_ENV: "1", "PYTHONUNBUFFERED": "1"}
        forked = zygote.spawn(argv, environment) if zygote is not None else None
        self.warm = forked is not None  # forked from the pre-imported zygote, else a fresh interpreter
        self.process = forked or subprocess.Popen(
            [sys.executable, "-m", "zk0.cli", *argv], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,  # the agent's signals are not the job's
            env=environment,
        )
        self.last_line = ""
        self._reader = threading.Thread(target=self._read, name=f"zk0-job-{kind}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            line = line.rstrip("\n")
            self._log.write(line + "\n")
            if line.strip() and not line.startswith(NOISE_PREFIXES):
                self.last_line = line.strip()
                self._on_line(self.kind, line)
        self._log.close()

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def forward(self, command: str, args: Mapping[str, Any] | None = None, timeout_s: float = 2.0) -> dict[str, Any]:
        """The job's own reply to an operator command (its control API); TimeoutError when it does not answer."""
        reply = control.request(self.control_address, command, timeout_s, args)
        if not reply.get("ok", False):
            raise ValueError(reply.get("error", f"the {self.kind} job refused {command}"))
        reply.pop("ok")
        return reply

    def interrupt(self) -> None:
        """SIGINT: the recorder saves the episode in progress and stops; a rollout or validation estops (hold, then
        torque off)."""
        if self.running:
            self.process.send_signal(signal.SIGINT)

    def stop(self, grace_s: float = STOP_GRACE_S) -> int | None:
        """Interrupt, wait up to `grace_s`, then kill the job's whole process group; its exit status."""
        self.interrupt()
        try:
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            log.error("%s job did not stop within %.0f s: killed", self.kind, grace_s)
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._reader.join(timeout=5.0)
        return self.process.returncode
