"""`zk0 fleet local`: a whole federation on this machine, over Flower's real deployment engine.

One `flower-superlink` and one `flower-supernode` per dataset, on loopback, with TLS (a fresh CA in
the run directory) and SuperNode authentication (one registered key pair per node). Nodes are named
after their dataset directory (`red`, `blue`, ...). Each `--drill-corrupt-node KIND` adds one more
SuperNode on the first dataset, named `drill-KIND`, that runs that fault-injection drill
(zk0.agent.node.DRILLS). With `--learn-workers`, every SuperNode gets a warm learning worker
(zk0.agent.learning_worker) on a unix socket in a private temporary folder. The run is submitted with
`flwr run`; everything started here is stopped before returning.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from zk0.agent.node import (
    DRILLS, NodeSettings, spawn_learn_worker, supernode_command, wait_for_learn_worker, with_learn_worker,
)
from zk0.server.certs import CertPaths, ensure_federation_keys
from zk0.common.flower_process import LaunchError, ManagedProcess, free_port
from zk0.server.launch import (
    ZK0_COMPONENTS,
    FlowerCli,
    RunConfigValue,
    SuperLinkSpec,
    start_superlink,
    wait_for_run,
    write_app_dir,
)
from zk0.server.run_dir import outcome_summary


@dataclass
class LocalFleet:
    """SuperLink + SuperNodes on loopback, rooted in `work_dir` (certs, logs, flwr home, app dir)."""

    work_dir: Path
    node_settings: list[NodeSettings] = field(default_factory=list)
    superlink: ManagedProcess | None = None
    supernodes: list[ManagedProcess] = field(default_factory=list)
    workers: dict[str, ManagedProcess] = field(default_factory=dict)  # learning workers by address
    socket_dir: Path | None = None  # their unix sockets (work_dir may be too long a path for one)
    node_ids: dict[str, int] = field(default_factory=dict)  # by node name, as the SuperLink registered them
    spec: SuperLinkSpec | None = None
    cli: FlowerCli | None = None

    @property
    def certs(self) -> CertPaths:
        return CertPaths(self.work_dir / "certs")

    def start_superlink(self, port: int | None = None) -> None:
        """Start (or restart, on the same port and state database) the SuperLink."""
        if self.spec is None:
            ensure_federation_keys(self.certs, ["localhost", "127.0.0.1"], [])
            self.spec = SuperLinkSpec(port=port or free_port(), certs=self.certs,
                                      database=self.work_dir / "superlink.db")
            self.cli = FlowerCli(self.work_dir / "flwr-home", self.spec)
        self.superlink = start_superlink(self.spec, self.work_dir / "logs" / "superlink.log")

    def add_node(self, name: str, datasets: list[Path], policy_store: Path,
                 extra_node_config: Mapping[str, RunConfigValue] | None = None, learn_worker: bool = False) -> int:
        """Make and register a key pair for `name`, then start its SuperNode (node config `node-name`: `name`),
        with a learning worker of its own if `learn_worker`; returns its node id."""
        assert self.spec is not None and self.cli is not None, "start_superlink() first"
        ensure_federation_keys(self.certs, [], [name])
        self.node_ids[name] = self.cli.register_node(self.certs.node_public_key(name), name=name)
        settings = NodeSettings(
            superlink=self.spec.address, datasets=datasets, policy_store=policy_store,
            root_certificates=self.certs.ca_cert, auth_private_key=self.certs.node_private_key(name),
            node_name=name, extra_node_config=dict(extra_node_config or {}),
        )
        if learn_worker:
            self.socket_dir = self.socket_dir or Path(tempfile.mkdtemp(prefix="zk0-fleet-"))
            address = f"ipc://{self.socket_dir / name}.sock"
            settings = with_learn_worker(settings, address)
            self.workers[address] = spawn_learn_worker(settings, address, self.work_dir / "logs" / f"learn-worker-{name}.log")
        self.node_settings.append(settings)
        self.supernodes.append(ManagedProcess(
            f"supernode-{name}", supernode_command(settings, runtime_port=free_port()),
            self.work_dir / "logs" / f"supernode-{name}.log",
        ))
        return self.node_ids[name]

    def wait_for_workers(self) -> None:
        """Block until every learning worker answers (they import torch and lerobot first)."""
        for address, worker in self.workers.items():
            wait_for_learn_worker(worker, address)

    def wait_until_online(self, timeout_s: float = 120.0) -> None:
        """Block until every started SuperNode has connected, so the run's first query reaches them all."""
        assert self.cli is not None, "start_superlink() first"
        deadline = time.monotonic() + timeout_s
        while (offline := set(self.node_ids.values()) - {n for n, s in self.cli.node_statuses().items() if s == "online"}):
            if time.monotonic() > deadline:
                raise LaunchError(f"SuperNodes {sorted(offline)} did not connect within {timeout_s:.0f} s; "
                                  f"see {self.work_dir / 'logs'}")
            time.sleep(1.0)

    def run(self, run_config: Mapping[str, RunConfigValue], timeout_s: float,
            components: Mapping[str, str] = ZK0_COMPONENTS, on_poll: Callable[[], None] | None = None,
            app_files: Mapping[str, str] | None = None) -> str:
        """Submit one run and wait for it; returns Flower's final status ('finished:completed', ...)."""
        assert self.cli is not None, "start_superlink() first"
        app_dir = write_app_dir(self.work_dir / "app", run_config, components)
        for name, text in (app_files or {}).items():
            (app_dir / name).write_text(text)
        run_id = self.cli.start_run(app_dir)
        return wait_for_run(self.cli, run_id, timeout_s, on_poll=on_poll)

    def stop_superlink(self) -> None:
        if self.superlink is not None:
            self.superlink.stop()
            self.superlink = None

    def stop(self) -> None:
        for node in self.supernodes:
            node.stop()
        self.supernodes.clear()
        for worker in self.workers.values():
            worker.stop()
        self.workers.clear()
        if self.socket_dir is not None:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
            self.socket_dir = None
        self.stop_superlink()

    def __enter__(self) -> LocalFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RoundProgress:
    """Prints one line per finished round, read from the run directory's metrics file."""

    def __init__(self, metrics_path: Path, rounds: int):
        self.metrics_path, self.rounds, self.printed = metrics_path, rounds, 0

    def __call__(self) -> None:
        try:
            rounds = json.loads(self.metrics_path.read_text())["rounds"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return
        for entry in rounds[self.printed:]:
            server_loss = entry.get("server_eval", {}).get("loss")
            loss_text = f"{server_loss:.4f}" if isinstance(server_loss, (int, float)) else "n/a"
            if entry["round"] == 0:
                print(f"round 0 (initial model): server eval loss {loss_text}", flush=True)
                continue
            outcomes = outcome_summary([c.get("outcome", "") for c in entry.get("clients", {}).values()])
            print(f"round {entry['round']}/{self.rounds}: {outcomes}, "
                  f"server eval loss {loss_text}, lr {entry['lr']:.3g}, mu {entry['mu']:.3g}", flush=True)
        self.printed = len(rounds)


def unique_names(names: Sequence[str]) -> list[str]:
    """`names` with repeats told apart: red, red, blue -> red, red-2, blue."""
    unique: list[str] = []
    for name in names:
        candidate, n = name, 1
        while candidate in unique:
            n += 1
            candidate = f"{name}-{n}"
        unique.append(candidate)
    return unique


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="fleet_command", required=True)
    local = sub.add_parser("local", help="SuperLink + one SuperNode per dataset on this machine")
    local.add_argument("--dataset", action="append", type=Path, required=True,
                       help="a LeRobot dataset root; one SuperNode per --dataset")
    local.add_argument("--rounds", type=int, default=3)
    local.add_argument("--out", type=Path, required=True, help="run directory")
    local.add_argument("--model", default="tiny", help="policy: tiny (offline stand-in) or a model path")
    local.add_argument("--config", type=Path, default=None, help="server YAML config (default: built-in defaults)")
    local.add_argument("--eval-dataset", action="append", type=Path, default=None,
                       help="server-side held-out dataset (default: the --dataset roots' held-out split)")
    local.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the run")
    local.add_argument("--drill-corrupt-node", choices=DRILLS, action="append", default=[], metavar="KIND",
                       help="drill (repeatable): add one more SuperNode on the first dataset, named drill-KIND, that "
                            "sends one kind of bad reply, to watch the server refuse it: nan / hash (broken update), "
                            "stats-nan (NaN statistics), inflate-examples (1000x its examples), huge-norm (delta "
                            "x1e4), stale-base (a delta against another global)")
    local.add_argument("--learn-workers", action="store_true",
                       help="give every SuperNode a warm learning worker (model built once per run, not per message)")


def run(args: argparse.Namespace) -> int:
    from zk0.server.config import ConfigError, load_server_config

    for root in args.dataset:
        if not (root / "meta" / "info.json").is_file():
            print(f"zk0 fleet: {root} is not a LeRobot dataset (no meta/info.json)")
            return 2
    try:
        config = load_server_config(args.config, overrides={
            "rounds": args.rounds, "model": args.model, "run_dir": str(args.out),
            "eval_datasets": [str(p) for p in (args.eval_dataset or args.dataset)],
            "min_nodes": len(args.dataset),
        })
    except ConfigError as err:
        print(f"zk0 fleet: {err}")
        return 2
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        with LocalFleet(out / "fleet") as fleet:
            fleet.start_superlink()
            # (dataset, drill) per SuperNode: one honest node per dataset, then the drill nodes on the first one
            nodes = [(root.resolve(), "") for root in args.dataset]
            nodes += [(nodes[0][0], kind) for kind in args.drill_corrupt_node]
            names = unique_names([f"drill-{kind}" if kind else root.name for root, kind in nodes])
            for name, (root, kind) in zip(names, nodes):
                fleet.add_node(name, [root], out / "fleet" / "nodes" / name / "policies",
                               extra_node_config={"drill": kind} if kind else None, learn_worker=args.learn_workers)
            fleet.wait_for_workers()
            fleet.wait_until_online()
            workers = ", each with a learning worker" if fleet.workers else ""
            print(f"fleet: SuperLink {fleet.spec.address} (TLS, node auth) + {len(fleet.supernodes)} SuperNodes{workers}",
                  flush=True)
            status = fleet.run(config.run_config(args.config.resolve() if args.config else None),
                               timeout_s=args.timeout, on_poll=RoundProgress(out / "federated_metrics.json", args.rounds))
    except LaunchError as err:
        print(f"zk0 fleet: {err}")
        return 1
    print(f"fleet: run {status} in {time.monotonic() - started:.0f} s; results in {out}")
    return 0 if status == "finished:completed" else 1
