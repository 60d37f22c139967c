"""The experiment's federated arms: zk0's real ServerApp and ClientApp over one of Flower's two runtimes, with one
warm learning worker per host either way.

- `simulation` (default): Flower's simulation runtime (`flwr.simulation.run_simulation`, the `flwr[simulation]`
  extra: Ray). The ServerApp runs in this process against an in-memory Grid that pulls replies every 0.1 s;
  ClientApps run in long-lived Ray actors, so no message starts a process or polls a SuperLink. The runtime gives
  its nodes only `partition-id` as node config, so thin wrappers put each host's zk0 node config (datasets,
  policy store, name, learning worker: zk0.agent.node.NodeSettings.node_config) into the Context and call the
  zk0 handlers (zk0.agent.client_app's query/train/evaluate, zk0.server.server_app's main) unchanged. Ray hands
  a message to whichever actor is free, not to the host's own, so the hosts' policies and data live in their
  learning workers (zk0.agent.learning_worker), which the actors relay to: the model is built once per host and
  run, never per message or per actor.
- `deployment`: the deployment engine of `zk0 fleet local --learn-workers` (cli/fleet.py: SuperLink and
  SuperNodes over TLS on loopback), for comparison; Flower's polling there costs seconds per message.

Both write the server's run directory (federated_metrics.json, checkpoints/round_N, plots) where the
ServerConfig says.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RUNTIMES = ("simulation", "deployment")


@dataclass(frozen=True)
class FederatedHost:
    name: str
    datasets: list[Path]
    policy_store: Path


def simulation_apps(run_config: Mapping[str, Any], node_configs: Sequence[Mapping[str, Any]]) -> tuple[Any, Any]:
    """(ServerApp, ClientApp) for the simulation runtime: zk0's own handlers, given `run_config` (the server's
    Flower run config) and, for the node of partition i, `node_configs[i]`."""
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp

    from zk0.agent import client_app as zk0_client
    from zk0.server import server_app as zk0_server

    server, client = ServerApp(), ClientApp()
    run_config, node_configs = dict(run_config), [dict(c) for c in node_configs]

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        context.run_config = dict(run_config)
        zk0_server.main(grid, context)

    def hosted(context: Context) -> Context:
        context.node_config.update(node_configs[int(context.node_config["partition-id"])])
        return context

    @client.query()
    def query(msg: Message, context: Context) -> Message:
        return zk0_client.query(msg, hosted(context))

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        return zk0_client.train(msg, hosted(context))

    @client.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return zk0_client.evaluate(msg, hosted(context))

    return server, client


class _Poller:
    """Calls `on_poll` every `period_s` in a thread while a blocking run goes on (the round progress lines)."""

    def __init__(self, on_poll, period_s: float = 2.0):
        self.on_poll, self.period_s, self.stop = on_poll, period_s, threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self.stop.wait(self.period_s):
            self.on_poll()

    def __enter__(self) -> _Poller:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.on_poll()


def _start_workers(hosts: Sequence[FederatedHost], log_dir: Path, stack: ExitStack) -> list[dict[str, Any]]:
    """One learning worker per host (stopped by `stack`); each host's node config, relaying to its worker."""
    from zk0.agent.node import NodeSettings, spawn_learn_worker, wait_for_learn_worker, with_learn_worker

    socket_dir = Path(tempfile.mkdtemp(prefix="zk0-exp-"))  # short: unix socket paths are limited to ~100 bytes
    stack.callback(shutil.rmtree, socket_dir, True)
    started = []
    for host in hosts:
        address = f"ipc://{socket_dir / host.name}.sock"
        settings = with_learn_worker(NodeSettings(superlink="simulation", datasets=host.datasets,
                                                  policy_store=host.policy_store, node_name=host.name), address)
        worker = spawn_learn_worker(settings, address, log_dir / f"learn-worker-{host.name}.log")
        stack.callback(worker.stop)
        started.append((settings, worker, address))
    for _, worker, address in started:  # they import torch and lerobot side by side
        wait_for_learn_worker(worker, address)
    return [settings.node_config() for settings, _, _ in started]


@contextmanager
def _logs_to(path: Path) -> Iterator[None]:
    """Send this process's log records (Flower's, Ray's, the ServerApp's) to `path` instead of the console, where
    only the experiment's progress lines go."""
    root, flower = logging.getLogger(), logging.getLogger("flwr")
    saved = root.handlers[:], root.level, flower.handlers[:]
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.handlers, flower.handlers = [handler], []
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.handlers, flower.handlers = saved[0], saved[2]
        root.setLevel(saved[1])
        handler.close()


def run_simulation(run_config: Mapping[str, Any], hosts: Sequence[FederatedHost], work_dir: Path, on_poll) -> None:
    """One federation over Flower's simulation runtime (see the module docstring); returns when it ends."""
    from flwr.simulation import run_simulation as flower_run_simulation

    with ExitStack() as stack:
        node_configs = _start_workers(hosts, work_dir / "logs", stack)
        server, client = simulation_apps(run_config, node_configs)
        # one Ray actor per host: they only relay to the workers, so three on two cores cost little
        backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                   "init_args": {"num_cpus": len(hosts), "include_dashboard": False, "log_to_driver": False,
                                 "logging_level": "ERROR"}}
        with _Poller(on_poll), _logs_to(work_dir / "logs" / "simulation.log"), \
                contextlib.redirect_stderr(stack.enter_context(open(work_dir / "logs" / "simulation.err", "a"))):
            flower_run_simulation(server_app=server, client_app=client, num_supernodes=len(hosts),
                                  backend_config=backend)


def run_deployment(run_config: Mapping[str, Any], hosts: Sequence[FederatedHost], work_dir: Path, on_poll,
                   timeout_s: float = 6 * 3600.0) -> None:
    """One federation over the deployment engine, as `zk0 fleet local --learn-workers` runs it."""
    from zk0.cli.fleet import LocalFleet
    from zk0.common.flower_process import LaunchError

    with LocalFleet(work_dir) as fleet:
        fleet.start_superlink()
        for host in hosts:
            fleet.add_node(host.name, host.datasets, host.policy_store, learn_worker=True)
        fleet.wait_for_workers()
        fleet.wait_until_online()
        status = fleet.run(run_config, timeout_s=timeout_s, on_poll=on_poll)
    if status != "finished:completed":
        raise LaunchError(f"federated run ended {status}; see {work_dir / 'logs'}")


def run_federation(runtime: str, run_config: Mapping[str, Any], hosts: Sequence[FederatedHost], work_dir: Path,
                   on_poll) -> float:
    """Run one federated arm on `runtime`; returns its wall time in seconds."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    started = time.monotonic()
    (run_simulation if runtime == "simulation" else run_deployment)(run_config, hosts, work_dir, on_poll)
    return time.monotonic() - started
