"""`zk0 demo`: the whole loop on one machine, on real processes.

On loopback: the server (SuperLink + ServerApp over TLS with node authentication, cli/fleet.py's LocalFleet)
and N simulated robot hosts, each a `zk0 agent --sim` with its own arm, cameras, dataset, policy store and task
mix (cli/demo_plan.py). The phases, each printed as it goes:
1. every host records its episodes with the scripted operator (`zk0ctl record start`), in parallel;
2. the federation runs R rounds; each host's agent lends its machine in its idle windows (training leases) and
   every round's global lands in its policy store. Once the server has saved round 0 (the base every host starts
   from), the demo puts it in every store as the active version `base-round0`;
3. every host validates the last global against its active policy in simulation (`zk0ctl validate --promote`:
   promoted if not worse), then rolls the active policy out once (`zk0ctl rollout start`);
4. the summary: DIR/summary.json, a table, DIR/plots/; the server's run directory is DIR/server/.
Everything started here is stopped on the way out, Ctrl-C included.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from zk0.cli.demo_hosts import DemoHost, HostError
from zk0.cli.demo_plan import (
    DATASET, SIM_BASE_SEED, DemoSettings, agent_config, host_plans, server_yaml, sim_base_dir,
)
from zk0.cli.demo_summary import BASE_RUN, event_line, host_row, rollout_outcome, table, write_plots

REPO = Path(__file__).resolve().parents[1]
AGENT_TEMPLATE = REPO / "configs" / "agent.yaml"
START_TIMEOUT_S = 600.0  # an agent up, its learning worker and SuperNode started (imports on a loaded machine)
JOB_TIMEOUT_S = 1800.0
RUN_ENTRIES = ("fleet", "server", "hosts", "plots", "summary.json", "server.yaml")  # what a run writes in its DIR


class DemoRun:
    """One demo run in `out`; `run()` returns the exit status, having stopped everything it started."""

    def __init__(self, settings: DemoSettings, out: Path) -> None:
        self.settings = settings
        self.out = out.resolve()
        self.plans = host_plans(settings)
        self.hosts = [DemoHost(plan.name, self.out / "hosts" / plan.name) for plan in self.plans]
        self.events: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self.phase_s: dict[str, float] = {}
        self.started = time.monotonic()
        self.rollout_lines: dict[str, str] = {}  # each host's rollout episode report line (its job output)

    # -- output --------------------------------------------------------------------------------------------
    def say(self, line: str) -> None:
        print(f"[{time.monotonic() - self.started:6.0f} s] {line}", flush=True)

    def drain_events(self) -> None:
        """Print the agents' events that came in (one line per host event worth one)."""
        while True:
            try:
                host, event = self.events.get_nowait()
            except queue.Empty:
                return
            if event.get("type") == "job" and event.get("kind") == "rollout" and "success=" in event.get("line", ""):
                self.rollout_lines[host] = event["line"]
            line = event_line(host, event)
            if line:
                self.say(line)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time one phase (summary.json's phase_seconds) and say when it is done."""
        since = time.monotonic()
        yield
        self.drain_events()
        self.phase_s[name] = round(time.monotonic() - since, 1)
        self.say(f"phase {name}: {self.phase_s[name]:.0f} s")

    # -- the run ---------------------------------------------------------------------------------------------
    def run(self) -> int:
        from zk0.cli.fleet import LocalFleet, RoundProgress
        from zk0.common.flower_process import LaunchError

        self.out.mkdir(parents=True, exist_ok=True)
        self.clear_previous_run()
        model = resolve_model(self.settings.model, self.out)
        self.say(f"zk0 demo: {len(self.hosts)} hosts x {self.settings.episodes} episodes, {self.settings.rounds} "
                 f"rounds, model {model}; everything under {self.out}")
        try:
            with ExitStack() as stack:  # unwinds last in, first out
                stack.callback(signal.signal, signal.SIGINT, signal.getsignal(signal.SIGINT))
                fleet = stack.enter_context(LocalFleet(self.out / "fleet"))
                stack.callback(self.stop_hosts)  # the agents stop before the SuperLink
                stack.callback(self.stopping)
                with self.phase("start"):
                    fleet.start_superlink()
                    self.start_hosts(fleet)
                with self.phase("record"):
                    self.record()
                with self.phase("federate"):
                    for host in self.hosts:
                        host.wait_for(lambda s: ((s.get("federation") or {}).get("supernode") or {}).get("running"),
                                      START_TIMEOUT_S, "SuperNode", self.drain_events)
                    fleet.wait_until_online()
                    status = self.federate(fleet, model, RoundProgress(self.server_dir / "federated_metrics.json",
                                                                       self.settings.rounds), stack)
                if status != "finished:completed":
                    self.say(f"zk0 demo: the federation ended {status}; see {self.out / 'fleet' / 'logs'}")
                    return 1
                with self.phase("validate"):
                    self.validate()
                with self.phase("rollout"):
                    rollouts = self.rollout()
                self.summarize(model, rollouts)
        except (HostError, LaunchError) as error:
            self.say(f"zk0 demo: {error}")
            return 1
        return 0

    def clear_previous_run(self) -> None:
        """A demo run starts fresh: a previous run's server directory would be resumed (and be done already), its
        SuperLink database already knows the node keys, and its hosts' stores already hold a base."""
        previous = [self.out / name for name in RUN_ENTRIES if (self.out / name).exists()]
        if previous:
            self.say(f"removing the previous demo run in {self.out}: {', '.join(p.name for p in previous)}")
        for path in previous:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()

    @property
    def server_dir(self) -> Path:
        return self.out / "server"

    def start_hosts(self, fleet: Any) -> None:
        from zk0.common.flower_process import free_port
        from zk0.server.certs import ensure_federation_keys

        template = yaml.safe_load(AGENT_TEMPLATE.read_text())
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # one torch thread per process
        for plan, host in zip(self.plans, self.hosts):
            ensure_federation_keys(fleet.certs, [], [plan.name])
            fleet.node_ids[plan.name] = fleet.cli.register_node(fleet.certs.node_public_key(plan.name), name=plan.name)
            host.start(agent_config(template, plan, self.settings, state_dir=host.state_dir,
                                    runtime_dir=host.runtime_dir, superlink=fleet.spec.address,
                                    ca_cert=fleet.certs.ca_cert, private_key=fleet.certs.node_private_key(plan.name),
                                    runtime_port=free_port()),
                       env)
            self.say(f"{plan.name}: zk0 agent --sim started (pid {host.process.pid}), tasks {', '.join(plan.tasks)}; "
                     f"zk0ctl --runtime-dir {host.runtime_dir} status")
        for host in self.hosts:
            host.wait_for(lambda s: s.get("state") == "idle", START_TIMEOUT_S, "idle agent", self.drain_events)
            host.follow_events(self.events)

    def record(self) -> None:
        """Every host records its sessions, one after the other on the host, the hosts side by side."""
        pending = {host.name: list(plan.sessions) for plan, host in zip(self.plans, self.hosts)}
        while any(pending.values()):
            self.drain_events()
            for host in self.hosts:
                status = host.status()
                if status.get("state") in ("fault", "estopped"):
                    raise HostError(f"{host.name}: {status['state']}: {status.get('reason')}; "
                                    f"see {host.state_dir / 'logs'}")
                if pending[host.name] and status.get("state") == "idle":
                    task, episodes, seed = pending[host.name].pop(0)
                    host.ctl("record", "start", "--dataset", DATASET, "--task", task, "--episodes", str(episodes),
                             "--seed", str(seed))
                    self.say(f"{host.name}: zk0ctl record start --dataset {DATASET} --task {task} "
                             f"--episodes {episodes} --seed {seed}")
                    host.wait_for(lambda s: s.get("state") == "recording", 60, "recording to start", self.drain_events)
            time.sleep(0.5)
        for host in self.hosts:
            done = host.wait_for(lambda s: s.get("state") != "recording", JOB_TIMEOUT_S, "end of recording",
                                 self.drain_events)
            if done.get("state") != "idle":
                raise HostError(f"{host.name}: recording ended {done.get('state')}: {done.get('reason')}")

    def federate(self, fleet: Any, model: str, progress: Any, cleanup: ExitStack) -> str:
        from zk0.server.config import load_server_config

        config_path = self.out / "server.yaml"
        config_path.write_text(server_yaml(self.settings))
        config = load_server_config(config_path, overrides={
            "rounds": self.settings.rounds, "model": model, "run_dir": str(self.server_dir),
            "min_nodes": len(self.hosts),
            "eval_datasets": [str(host.state_dir / "datasets" / DATASET) for host in self.hosts]})
        self.say(f"server: SuperLink {fleet.spec.address} (TLS, node auth), {len(self.hosts)} SuperNodes online; "
                 f"{self.settings.rounds} rounds of {self.settings.local_steps} local steps")

        seeding = BaseSeeding(self.server_dir / "checkpoints" / "round_0", [h.policy_store for h in self.hosts],
                              self.out / "fleet" / "logs" / "seed-base.log")
        cleanup.callback(seeding.stop)

        def poll() -> None:
            self.drain_events()
            progress()
            if seeding.start_when_ready():
                self.say("the server saved round 0: putting it in every host's store as the active base-round0")

        status = fleet.run(config.run_config(config_path), timeout_s=self.settings.round_timeout_s *
                           (self.settings.rounds + 1), on_poll=poll)
        if status == "finished:completed":
            self.say(f"every host started from the base: {seeding.result()} (the server's round 0)")
        return status

    def final_versions(self) -> dict[str, str]:
        """Each host's last global: the newest round in its store."""
        versions = {}
        for host in self.hosts:
            rounds = {}
            for path in (host.policy_store / "versions").glob("*/version.json"):
                info = json.loads(path.read_text())
                if info.get("run") != BASE_RUN:
                    rounds[int(info["round"])] = path.parent.name
            if not rounds:
                raise HostError(f"{host.name}: no global policy arrived in {host.policy_store}")
            versions[host.name] = rounds[max(rounds)]
        return versions

    def validate(self) -> None:
        versions = self.final_versions()
        for host in self.hosts:
            host.ctl("validate", "--policy", versions[host.name], "--promote")
            self.say(f"{host.name}: zk0ctl validate --policy {versions[host.name]} --promote "
                     f"({self.settings.validation_episodes} paired episodes in simulation against the active policy)")
        for host in self.hosts:
            done = host.wait_for(lambda s: s.get("state") != "validating", JOB_TIMEOUT_S, "validation",
                                 self.drain_events)
            self.say(f"{host.name}: {done.get('reason')}")

    def rollout(self) -> dict[str, str | None]:
        """One rollout of each host's active policy on its first task; its outcome per host."""
        for plan, host in zip(self.plans, self.hosts):
            host.ctl("rollout", "start", "--task", plan.tasks[0], "--policy", "active", "--episodes", "1",
                     "--episode-time-s", str(self.settings.rollout_time_s))
            self.say(f"{host.name}: zk0ctl rollout start --task {plan.tasks[0]} --policy active --episodes 1")
        for host in self.hosts:
            done = host.wait_for(lambda s: s.get("state") != "rollout", JOB_TIMEOUT_S, "rollout", self.drain_events)
            if done.get("state") != "idle":
                self.say(f"{host.name}: the rollout ended {done.get('state')}: {done.get('reason')}; zk0ctl clear")
                host.ctl("clear")
        time.sleep(1.0)  # the job's last lines reach the event stream just before its end
        self.drain_events()
        return {host.name: rollout_outcome(self.rollout_lines.get(host.name)) for host in self.hosts}

    def summarize(self, model: str, rollouts: dict[str, str | None]) -> None:
        self.drain_events()
        metrics = json.loads((self.server_dir / "federated_metrics.json").read_text())
        rounds = metrics.get("rounds", [])
        rows = [host_row(plan.name, plan.tasks, sum(n for _, n, _ in plan.sessions), host.newest_report(),
                         rounds, rollouts.get(host.name)) for plan, host in zip(self.plans, self.hosts)]
        plots = write_plots(self.out / "plots", rows, rounds)
        summary = {"settings": asdict(self.settings), "model": model, "hosts": rows,
                   "server": {"run_dir": str(self.server_dir), "rounds": [
                       {"round": r["round"], "server_eval_loss": (r.get("server_eval") or {}).get("loss")}
                       for r in rounds]},
                   "phase_seconds": self.phase_s, "wall_seconds": round(time.monotonic() - self.started, 1),
                   "plots": [str(p) for p in plots]}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        print("\n" + table(rows), flush=True)
        self.say(f"summary: {self.out / 'summary.json'}; plots: {self.out / 'plots'}; server run: {self.server_dir}")

    def stopping(self) -> None:
        """From here on Ctrl-C is ignored: a second one must not cut the clean-up short and leave processes behind."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.say("stopping the agents and the server")

    def stop_hosts(self) -> None:
        for host in self.hosts:
            host.stop()


class BaseSeeding:
    """Puts the server's round-0 checkpoint into every host's store (demo_hosts.seed_base) in a process of its own,
    started once the checkpoint is complete: loading a model takes a while on a loaded machine, and the progress
    lines must keep coming meanwhile. The first global a store receives would become active by itself; the
    base is promoted over it if it came first."""

    def __init__(self, checkpoint: Path, stores: list[Path], log_path: Path) -> None:
        self.checkpoint, self.stores, self.log_path = checkpoint, stores, log_path
        self.process: subprocess.Popen | None = None

    def start_when_ready(self) -> bool:
        """Start the seeding if the checkpoint is complete and it has not started yet; True when it starts now."""
        if self.process is not None or not (self.checkpoint / "zk0.json").exists():
            return False
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "zk0.cli.demo_hosts", str(self.checkpoint), BASE_RUN, *map(str, self.stores)],
                stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True)
        return True

    def result(self) -> str:
        """The base's version name once every store has it (waits for the seeding)."""
        if self.process is None:
            raise HostError(f"the server never saved round 0 ({self.checkpoint})")
        output, _ = self.process.communicate()
        if self.process.returncode != 0:
            raise HostError(f"the base could not be put in the hosts' stores; see {self.log_path}")
        return output.strip().splitlines()[-1]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def resolve_model(model: str, out: Path) -> str:
    """The federation's `model`: tiny, or a checkpoint directory (the sim base, built on first use)."""
    from zk0.learn.sim_base import is_current

    if model != "sim-base":
        return model
    from zk0.cli.experiment_training import cached_sim_base

    if not is_current(sim_base_dir()):
        print(f"zk0 demo: building the sim base into {sim_base_dir()} (once; log {out / 'sim-base.log'})", flush=True)
    return str(cached_sim_base(SIM_BASE_SEED, out / "sim-base.log",
                               lambda line: print(f"zk0 demo: building the sim base: {line}", flush=True)))

