"""`zk0 agent` (console script `zk0-agent`): the robot host's daemon, started by systemd (zk0-agent.service).

It owns the robot (zk0.agent.ownership): recording sessions, rollouts and validations run as its jobs, one at a
time (zk0.agent.daemon_core, with the state machine of zk0.agent.daemon_state); it grants the training leases
its Flower SuperNode's ClientApps ask for, inside the configured idle windows (zk0.agent.idle), and revokes them
when an operator needs the robot; it supervises that SuperNode and the warm learning worker its ClientApps hand
their work to (zk0.agent.supernode). Operators and tools talk
to it through `zk0ctl` at `<runtime-dir>/agent.sock` (mode 0660, group zk0) and follow it at
`<runtime-dir>/events.sock` (zk0.agent.events).

systemd: READY=1 once the config is valid, both sockets are bound and the hardware answers: every motor of both
arms answers a ping and every camera delivers a frame (zk0.agent.readiness). Until then the agent is `starting`:
STATUS= and `zk0ctl status` say what is missing, requests other than status and estop are refused, the check is
retried, and after two minutes the agent exits 1 for systemd to restart it. WATCHDOG=1 from the agent's loop at
half the configured WatchdogSec, so a hung loop stops the pings; STATUS= follows the state. SIGTERM: STOPPING=1,
no new job or lease from then on, the lease is revoked (its holder stops training at the next step boundary), the
job is stopped (a recording saves the episode in progress as far as it got, committed whole like every episode,
and disconnects the arms, which turns the follower's torque off; a rollout or validation holds, then cuts
torque), the SuperNode and learning worker are stopped, and the agent exits 0. SIGHUP reloads the config; an
invalid one is refused, logged and the old one kept. `--sim` runs every job on the simulated rig with the
scripted operator, and needs no config file; the agent starts that rig once and keeps it (`SimRig`), as a real
host's arms and cameras exist before any job, so a job only connects to it, and checks it before READY.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from zk0.agent.control import share_with_group
from zk0.agent.record_cli import sim_rig_options
from zk0.common.typed_yaml import to_plain

DEFAULT_CONFIG = Path("/etc/zk0/agent.yaml")
DEFAULT_STATE_DIR = Path("/var/lib/zk0")
LOOP_PERIOD_S = 0.2
DRILL_ENV = "ZK0_AGENT_DRILL"  # "hang-loop-after:SECONDS": the loop stops (for the systemd watchdog test)
log = logging.getLogger("zk0.agent")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help=f"agent config (default {DEFAULT_CONFIG}; with --sim: built-in defaults)")
    parser.add_argument("--sim", action="store_true", help="simulated rig and scripted operator for every job")
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                        help="datasets, policies, reports and logs (default %(default)s)")
    parser.add_argument("--runtime-dir", type=Path, help="sockets and the robot lock (default $ZK0_RUNTIME_DIR or /run/zk0)")
    parser.add_argument("--check-config", action="store_true", help="print the effective config, or its errors, and exit")
    parser.add_argument("--log-level", default="INFO", help="logging level (default %(default)s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zk0-agent", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def sim_defaults(state_dir: Path) -> dict[str, Any]:
    """The config `--sim` runs with when none is given: jobs replace ports, cameras and calibration with the rig's."""
    return {"host_id": socket.gethostname(), "robot_type": "so101",
            "follower": {"port": "sim", "id": "follower", "calibration_dir": str(state_dir / "calibration")},
            "leader": {"port": "sim", "id": "leader", "calibration_dir": str(state_dir / "calibration")},
            "cameras": [{"name": "front", "type": "zmq"}, {"name": "wrist", "type": "zmq"}],
            "datasets_root": str(state_dir / "datasets")}


def load_agent_config(args: argparse.Namespace) -> Any:
    """The config the agent runs with; ConfigError naming the key (and file) when it is wrong."""
    from zk0.agent.config import load_config, parse_config

    if args.config is None and args.sim:
        return parse_config(sim_defaults(args.state_dir), source="built-in --sim defaults")
    return load_config(args.config or DEFAULT_CONFIG, check_devices=not args.sim)


def prepare_dir(path: Path, what: str, mode: int) -> Path:
    """Create `path` if needed and check this process can write there; OSError with one clear line if not."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=mode)
        probe = path / f".zk0-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise OSError(f"{what} {path} is not writable by this user ({error.strerror or error}); "
                      f"pass --{what.replace(' ', '-')} or fix its owner") from None
    return path


def run(args: argparse.Namespace) -> int:
    from zk0.agent import systemd
    from zk0.agent.config import ConfigError
    from zk0.agent.ownership import RobotOwned, runtime_dir

    systemd.configure_logging(args.log_level)
    args.runtime_dir = args.runtime_dir or runtime_dir()
    try:
        config = load_agent_config(args)
    except ConfigError as error:
        print(f"zk0 agent: {error}", file=sys.stderr)
        return 2
    if args.check_config:
        print(yaml.safe_dump(to_plain(config), sort_keys=False), end="")
        return 0
    try:
        prepare_dir(args.state_dir, "state dir", 0o750)
        created = not args.runtime_dir.exists()
        prepare_dir(args.runtime_dir, "runtime dir", 0o750)
        if created:  # a folder systemd made (RuntimeDirectory=) or the admin chose keeps its owner and mode
            share_with_group(args.runtime_dir, 0o750)
        agent = Agent(config, args)
    except (OSError, RobotOwned) as error:
        print(f"zk0 agent: {error}", file=sys.stderr)
        return 2
    return agent.serve()


class Agent:
    """The daemon's process shell: sockets, the SuperNode, signals, systemd, the loop; decisions are the core's."""

    def __init__(self, config: Any, args: argparse.Namespace) -> None:
        from zk0.agent.control import ControlServer
        from zk0.agent.daemon_core import COMMANDS, AgentCore, AgentPaths
        from zk0.agent.events import EventPublisher
        from zk0.agent.ownership import RobotLock

        self.args = args
        self.paths = AgentPaths(args.state_dir.resolve(), args.runtime_dir.resolve())
        self.lock = RobotLock(self.paths.runtime_dir)
        self.lock.acquire()
        self.events = EventPublisher(self.paths.events)
        federation = config.federation
        store = federation.policy_store if federation else self.paths.state_dir / "policies"
        # STARTING until the hardware answered (serve): no job may race the check for the bus
        self.core = AgentCore(config, self.paths, args.sim, store, self.events.publish, starting=True)
        # before the control socket exists: no request can change the state ahead of this event
        self.events.publish("state", state=self.core.state.value, previous=None, reason="agent started")
        self._write_effective_config(config)
        self.control = ControlServer(self.paths.control, COMMANDS, self.core.handle)
        self._control_dead_logged = False
        for path in (self.paths.runtime_dir / "agent.sock", self.paths.runtime_dir / "events.sock"):
            share_with_group(path, 0o660)
        from zk0.agent.daemon_jobs import without_systemd
        from zk0.agent.job_zygote import Zygote

        self.paths.logs.mkdir(parents=True, exist_ok=True)
        self.core.zygote = Zygote(self.paths.logs / "zygote.log", without_systemd(os.environ))
        self.sim_rig = SimRig(self.paths.sim_rig, self.paths.runtime_dir / "sim-calibration") if args.sim else None
        self._keep_sim_rig()
        self.federation = self._federation(config)
        self.core.extra_status = lambda: {"federation": self.federation.describe() if self.federation else None,
                                          "sim_rig": None if self.sim_rig is None else self.sim_rig.serving is not None}
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._status_sent = ""

    def _write_effective_config(self, config: Any) -> None:
        path = self.paths.effective_config
        tmp = path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(to_plain(config), sort_keys=False))
        tmp.replace(path)

    def _federation(self, config: Any):
        from zk0.agent.supernode import FederationProcesses

        if config.federation is None:
            return None
        return FederationProcesses(config, self.paths.control, f"ipc://{self.paths.runtime_dir / 'learn.sock'}",
                                   self.paths.logs, self.events.publish)

    def serve(self) -> int:
        from zk0.agent import systemd

        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self._reload.set())
        interval = systemd.watchdog_interval_s()
        ping_every = interval / 2 if interval else None
        last_ping = 0.0
        try:
            decision = self._await_hardware()
            if decision is None:  # SIGTERM while starting
                return 0
            if decision.action == "give-up":
                log.error("zk0 agent not ready, giving up: %s", decision.reason)
                return 1
            self.core.ready(decision.reason)
            hang_at = _drill_hang_at()
            systemd.ready(self._status_line())
            log.info("zk0 agent ready (%s): control %s, events %s, state %s%s", decision.reason, self.paths.control,
                     self.paths.events, self.paths.state_dir, " (sim)" if self.args.sim else "")
            while not self._stop.wait(LOOP_PERIOD_S):
                if hang_at is not None and time.monotonic() >= hang_at:
                    log.warning("drill: the agent's loop hangs now (%s)", DRILL_ENV)
                    self._stop.wait()
                    break
                if self._reload.is_set():
                    self._reload.clear()
                    self._reload_config()
                try:
                    self.core.tick()
                    self._keep_sim_rig()
                    if self.federation is not None:
                        self.federation.tick()
                    self._send_status()
                except Exception:  # one bad tick must not end the agent that keeps the robot safe; it is logged
                    log.exception("agent loop tick failed")
                if ping_every and time.monotonic() - last_ping >= ping_every and self._control_alive():
                    systemd.watchdog()
                    last_ping = time.monotonic()
        finally:
            self._shutdown()
        return 0

    def _control_alive(self) -> bool:
        """Whether the control API still answers; once it does not, the watchdog pings stop (logged once)."""
        if self.control.alive:
            return True
        if not self._control_dead_logged:
            log.error("the control API stopped answering: watchdog pings stop, so systemd restarts the agent")
            self._control_dead_logged = True
        return False

    def _await_hardware(self):
        """zk0.agent.readiness's verdict on the hardware the jobs will open (the --sim rig's with --sim); None when
        SIGTERM came first."""
        from zk0.agent import readiness
        from zk0.agent.daemon_jobs import without_systemd

        def attempt() -> list[str]:
            self._keep_sim_rig()  # with --sim: a rig that failed to start is retried here
            if self.sim_rig is None:
                hardware = readiness.config_hardware(self.core.config)
            elif self.sim_rig.info is None:
                return ["the simulated rig is not up"]
            else:
                hardware = readiness.rig_hardware(self.sim_rig.info)
            return readiness.run_probe(hardware, self._stop, without_systemd(os.environ))

        def report(decision) -> None:
            if decision.action != "ready":
                log.warning("zk0 agent not ready: %s", decision.reason)
                self.core.not_ready(decision.reason)
                self._send_status()

        self._send_status()
        return readiness.wait_until_ready(attempt, report, self._stop)

    def _keep_sim_rig(self) -> None:
        """With --sim: (re)start the rig when it is missing, died, or no longer simulates the config (SIGHUP), never
        under a job that drives it. Its description goes before the lock is let go: a job started later starts its
        own rig until the new one is up."""
        if self.sim_rig is None:
            return
        with self.core.lock:
            wanted = sim_rig_options(self.core.config)
            job_running = self.core.job is not None and self.core.job.running
            if not rig_needs_start(self.sim_rig.serving, wanted, job_running, self.sim_rig.retry_at, time.monotonic()):
                return
            self.sim_rig.withdraw()
        self.sim_rig.restart(wanted)

    def _status_line(self) -> str:
        core = self.core
        job = f", {core.job.kind}: {core.job.last_line[:120]}" if core.job and core.job.last_line else ""
        return f"{core.state.value}: {core.reason}{job}"

    def _send_status(self) -> None:
        from zk0.agent import systemd

        line = self._status_line()
        if line != self._status_sent:
            systemd.status(line)
            self._status_sent = line

    def _reload_config(self) -> None:
        from zk0.agent import systemd
        from zk0.agent.config import ConfigError

        systemd.reloading()
        try:
            config = load_agent_config(self.args)
        except ConfigError as error:
            log.error("config reload refused, keeping the running config: %s", error)
            self.events.publish("config", status="refused", error=str(error))
        else:
            with self.core.lock:
                federation_changed = config.federation != self.core.config.federation
                self.core.config = config
                self._write_effective_config(config)
            if federation_changed:
                if self.federation is not None:
                    self.federation.stop()
                self.federation = self._federation(config)
            log.info("config reloaded%s", " (SuperNode restarted)" if federation_changed else "")
            self.events.publish("config", status="reloaded", supernode_restarted=federation_changed)
        systemd.ready(self._status_line())

    def _shutdown(self) -> None:
        from zk0.agent import systemd

        systemd.stopping("stopping")
        log.info("zk0 agent stopping")
        job = self.core.begin_stopping()
        if job is not None:
            code = job.stop()
            log.info("%s job stopped (exit status %s)", job.kind, code)
            self.core.tick()  # how it ended: its event and the state it leaves, before "stopped"
        if self.federation is not None:
            self.federation.stop()
        self.core.zygote.close()
        if self.sim_rig is not None:
            self.sim_rig.close()
        self.events.publish("state", state="stopped", previous=self.core.state.value, reason="agent stopped")
        self.control.close()
        self.events.close()
        self.lock.release()


SIM_RIG_RETRY_S = 5.0  # after a failed start of the agent's simulated rig (its jobs start their own meanwhile)


def rig_needs_start(serving: dict[str, Any] | None, wanted: dict[str, Any], job_running: bool, retry_at: float,
                    now: float) -> bool:
    """Whether the agent's simulated rig must be (re)started: none is running (`serving`: the options of the live
    one) or it simulates other hardware than the config's, no job is driving it, and a failed start is not too
    recent."""
    return not job_running and serving != wanted and now >= retry_at


class SimRig:
    """The simulated rig `zk0 agent --sim` keeps for its jobs (zk0.hw.sim.rig), its description (the rig's JSON
    `start` line) at `description`, where jobs attach to it (`zk0 record --sim-rig`)."""

    def __init__(self, description: Path, calibration_dir: Path) -> None:
        self.description = description
        self.calibration_dir = calibration_dir
        self.retry_at = 0.0  # time.monotonic()
        self._rig = None
        self._options: dict[str, Any] | None = None

    @property
    def info(self) -> dict[str, Any] | None:
        """The running rig's description (ports, cameras); None when there is none."""
        return self._rig.info if self.serving is not None else None

    @property
    def serving(self) -> dict[str, Any] | None:
        """The `RigHandle.start` options of the running rig; None when there is none (never started, or died)."""
        running = self._rig is not None and self._rig.process.poll() is None
        return self._options if running else None

    def withdraw(self) -> None:
        """Unlink the description: no job attaches to this rig from now on."""
        self.description.unlink(missing_ok=True)

    def restart(self, options: dict[str, Any]) -> None:
        """Stop the rig (withdrawn first) and start one simulating `options`; the description names it once up."""
        from zk0.hw.sim.rig_handle import RigError, RigHandle

        self._stop()
        try:
            self._rig = RigHandle.start(**options, calibration_dir=self.calibration_dir)
        except (RigError, OSError, ValueError) as error:
            self.retry_at = time.monotonic() + SIM_RIG_RETRY_S
            log.error("simulated rig did not start (jobs start their own; retrying in %.0f s): %s", SIM_RIG_RETRY_S, error)
            return
        self._options = options
        tmp = self.description.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._rig.info))
        tmp.replace(self.description)
        log.info("simulated rig up for the jobs (%s)", self.description)

    def close(self) -> None:
        self.withdraw()
        self._stop()

    def _stop(self) -> None:
        if self._rig is not None:
            self._rig.close()
        self._rig, self._options = None, None


def _drill_hang_at() -> float | None:
    value = os.environ.get(DRILL_ENV, "")
    if not value.startswith("hang-loop-after:"):
        return None
    return time.monotonic() + float(value.split(":", 1)[1])
