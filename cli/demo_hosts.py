"""The demo's simulated robot hosts: each a real `zk0 agent --sim` process with its own state and runtime dirs,
driven through `zk0ctl` and followed on its event stream, as an operator or a script would on a real host.

An agent runs in its own session (process group), so a Ctrl-C at the terminal reaches the demo alone and the
demo stops the agents in order: SIGTERM (the agent stops its job, revokes its lease, stops its SuperNode,
learning worker, job zygote and simulated rig, and exits), then SIGKILL of the group if it does not exit in time.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from zk0.agent.control import request

AGENT_STOP_S = 60.0  # SIGTERM -> exit: a job to stop, a SuperNode and a learning worker to end
ZK0CTL = [sys.executable, "-c", "import sys; from zk0.agent.ctl import main; sys.exit(main())"]


class HostError(RuntimeError):
    """A host did not get where the demo needed it (the message names the host and its log)."""


@dataclass
class DemoHost:
    name: str
    root: Path  # state/, run/, agent.yaml and agent.log live here
    process: subprocess.Popen | None = None

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def runtime_dir(self) -> Path:
        return self.root / "run"

    @property
    def config_path(self) -> Path:
        return self.root / "agent.yaml"

    @property
    def log_path(self) -> Path:
        return self.root / "agent.log"

    @property
    def policy_store(self) -> Path:
        return self.state_dir / "policies"

    def start(self, config: Mapping[str, Any], env: Mapping[str, str]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "zk0.cli", "agent", "--sim", "--config", str(self.config_path),
                 "--state-dir", str(self.state_dir), "--runtime-dir", str(self.runtime_dir)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=dict(env))

    def status(self) -> dict[str, Any]:
        """The agent's status (`zk0ctl status --json`), {} while it does not answer."""
        try:
            reply = request(f"ipc://{self.runtime_dir / 'agent.sock'}", "status", 2.0)
        except TimeoutError:
            return {}
        return reply if reply.get("ok") else {}

    def ctl(self, *args: str) -> str:
        """Run `zk0ctl --runtime-dir RUN ARGS`; its output, or HostError with the agent's refusal."""
        result = subprocess.run([*ZK0CTL, "--runtime-dir", str(self.runtime_dir), *args], capture_output=True,
                                text=True, timeout=120, stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise HostError(f"{self.name}: zk0ctl {' '.join(args)}: {(result.stderr or result.stdout).strip()}")
        return result.stdout

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float, what: str,
                 tick: Callable[[], None] = lambda: None) -> dict[str, Any]:
        """Poll the status until `predicate` holds; `tick()` between polls (the demo prints progress there)."""
        deadline = time.monotonic() + timeout_s
        while True:
            current = self.status()
            if current and predicate(current):
                return current
            if self.process is not None and self.process.poll() is not None:
                raise HostError(f"{self.name}: the agent exited ({self.process.returncode}) while waiting for "
                                f"{what}; see {self.log_path}")
            if time.monotonic() > deadline:
                raise HostError(f"{self.name}: no {what} within {timeout_s:.0f} s (state {current.get('state')}: "
                                f"{current.get('reason')}); see {self.log_path}")
            tick()
            time.sleep(0.5)

    def follow_events(self, sink: queue.Queue[tuple[str, dict[str, Any]]]) -> None:
        """Put every event the agent publishes from now on into `sink` as (host name, event)."""
        from zk0.agent.events import follow

        address = self.status().get("events") or f"ipc://{self.runtime_dir / 'events.sock'}"

        def pump() -> None:
            for event in follow(address):
                sink.put((self.name, event))

        # a daemon thread: follow() blocks on the socket, and the process may end with it still subscribed
        threading.Thread(target=pump, name=f"events-{self.name}", daemon=True).start()

    def newest_report(self) -> dict[str, Any] | None:
        """The agent's latest validation report (`<state-dir>/reports/<time>/report.json`)."""
        reports = sorted((self.state_dir / "reports").glob("*/report.json"))
        return json.loads(reports[-1].read_text()) if reports else None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL of its whole process group if it outstays `AGENT_STOP_S`."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(AGENT_STOP_S)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # anything of its group still there (the agent's own children)
        except ProcessLookupError:
            pass
        self.process.wait()


def seed_base(checkpoint: Path, stores: list[Path], run: str) -> str:
    """Put `checkpoint` (the federation's round-0 global: the base every host starts from) into each host's policy
    store as version `<run>-round0` and make it active (`zk0 policy import --activate`); returns the version name."""
    from zk0.agent.policy_store import PolicyStore

    name = ""
    for store in stores:
        policies = PolicyStore(store)
        name = policies.add_checkpoint(checkpoint, run=run).name
        if policies.state().active != name:  # a round's global came first and became active by itself
            policies.promote(name, reason="the demo's base policy (the federation's round 0)")
    return name


def main(argv: list[str] | None = None) -> int:
    """`python -m zk0.cli.demo_hosts CHECKPOINT RUN STORE...`: seed_base in a process of its own (the demo's own
    process keeps printing progress meanwhile, and lerobot's model-loading chatter stays out of it); prints the
    version name last."""
    args = sys.argv[1:] if argv is None else argv
    print(seed_base(Path(args[0]), [Path(a) for a in args[2:]], args[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
