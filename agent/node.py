"""`zk0 node`: run this host's Flower SuperNode.

Reads the `federation:` section of the agent config (zk0.agent.config.FederationSettings, typed and
checked like the rest of the file; no device is opened) plus `host_id` and `datasets_root`:

    federation:
      superlink: "server.example.org:9093"
      root_certificates: /etc/zk0/certs/ca.crt     # the federation CA (from `zk0 certs`)
      auth_private_key: /etc/zk0/certs/node.key    # this node's SuperNode key; its .pub is registered
      datasets: [so101_pick]                       # dataset names under datasets_root, or absolute roots
      policy_store: /var/lib/zk0/policies          # where global policies are saved each round
      agent_address: ""                            # agent IPC (training lease); empty: train directly
      device: cpu
      runtime_port: 9094                           # local port the SuperNode serves its ClientApps on
      insecure: false                              # only for isolated test networks
      node_name: arm1                              # how the server names this node; default: host_id
      keep_versions: 20                            # the policy store keeps the newest 20 versions ...
      max_policy_store: 5G                         # ... within 5 GiB (null: no limit; never active/previous)

`zk0 node --config FILE --check` prints the supernode command line and the node config it would run
with, or the config's mistake, and exits.

`zk0 node --learn-worker [ADDRESS]` first starts a warm learning worker (zk0.agent.learning_worker, default
address `ipc://<policy store's folder>/learn-worker.sock`), serving only the node's datasets and policy store,
and gives the SuperNode's ClientApps its address (node config `learn-worker`): the model is then built once per
run instead of once per message. Both run as children logging to `<policy store's folder>/logs/`; when either
exits, the other is stopped and `zk0 node` exits non-zero, so systemd's `Restart=` restarts them together.
Without the option, `zk0 node` becomes `flower-supernode` (exec), as before. The SuperNode runs with TLS and SuperNode authentication;
Flower 1.41 SuperNodes never install app dependencies at run time unless
`--allow-runtime-dependency-installation` is given, which zk0 never passes: the host environment is
installed once, by the package manager.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import signal
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from zk0.agent.config import AgentConfig, load_config
from zk0.agent.policy_rules import parse_size
from zk0.common.flower_process import LaunchError, ManagedProcess, flower_env, flower_tool
from zk0.common.typed_yaml import ConfigError

# Fault-injection drills a node can run (node config `drill`, see zk0.agent.client_app): each makes the node
# send one kind of reply the server must refuse or contain. Here, so `zk0 fleet` lists them without torch.
DRILLS = ("nan", "hash", "stats-nan", "inflate-examples", "huge-norm", "stale-base")

NodeConfigValue = str | int | float | bool


@dataclass(frozen=True)
class NodeSettings:
    """One SuperNode: where it connects, how, and the node config its ClientApps read."""

    superlink: str
    datasets: list[Path]
    policy_store: Path
    root_certificates: Path | None = None
    auth_private_key: Path | None = None
    agent_address: str = ""
    device: str = "cpu"
    insecure: bool = False
    runtime_port: int | None = None
    node_name: str = ""
    keep_versions: int | None = None
    max_policy_bytes: int | None = None
    extra_node_config: dict[str, NodeConfigValue] = field(default_factory=dict)

    def node_config(self) -> dict[str, NodeConfigValue]:
        """What the ClientApp reads from `context.node_config` (a limit left out is no limit)."""
        limits = {"policy-keep": self.keep_versions, "policy-max-bytes": self.max_policy_bytes}
        return {
            "dataset-roots": ",".join(str(p) for p in self.datasets),
            "policy-store": str(self.policy_store),
            "agent-address": self.agent_address,
            "device": self.device,
            "node-name": self.node_name,
            **{key: value for key, value in limits.items() if value is not None},
            **self.extra_node_config,
        }


def node_settings(config: AgentConfig) -> NodeSettings:
    """The SuperNode an agent config describes: dataset names resolved under `datasets_root`, the node
    named after the host unless `federation.node_name` says otherwise."""
    federation = config.federation
    if federation is None:
        raise ConfigError("federation: section missing (superlink address, certificates, datasets)")
    return NodeSettings(
        superlink=federation.superlink,
        datasets=[Path(name) if os.path.isabs(name) else config.datasets_root / name for name in federation.datasets],
        policy_store=federation.policy_store,
        root_certificates=federation.root_certificates,
        auth_private_key=federation.auth_private_key,
        agent_address=federation.agent_address,
        device=federation.device,
        insecure=federation.insecure,
        runtime_port=federation.runtime_port,
        node_name=federation.node_name or config.host_id,
        keep_versions=federation.keep_versions,
        max_policy_bytes=None if federation.max_policy_store is None else parse_size(federation.max_policy_store),
    )


def load_node_settings(path: Path) -> NodeSettings:
    """`node_settings` of an agent config file; a mistake raises one `ConfigError` line naming the key."""
    config = load_config(path, check_devices=False)
    try:
        return node_settings(config)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def format_node_config(values: Mapping[str, NodeConfigValue]) -> str:
    """Flower's `--node-config` syntax: space-separated TOML `key=value` pairs."""
    parts = []
    for key, value in values.items():
        if isinstance(value, bool):
            parts.append(f"{key}={'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            parts.append(f"{key}={value!r}")
        else:
            parts.append(f'{key}="{value}"')
    return " ".join(parts)


def supernode_command(settings: NodeSettings, runtime_port: int | None = None) -> list[str]:
    """The `flower-supernode` command line for `settings` (`runtime_port` overrides the settings' port)."""
    runtime_port = runtime_port if runtime_port is not None else settings.runtime_port
    command = [flower_tool("flower-supernode"), "--superlink", settings.superlink,
               "--node-config", format_node_config(settings.node_config())]
    if settings.insecure:
        command.append("--insecure")
    elif settings.root_certificates is not None:
        command += ["--root-certificates", str(settings.root_certificates)]
    if settings.auth_private_key is not None:
        command += ["--auth-supernode-private-key", str(settings.auth_private_key)]
    if runtime_port is not None:
        # Each SuperNode serves a local Runtime API to its ClientApp processes; several on one machine need distinct ports.
        command += ["--port", str(runtime_port)]
    return command


def describe(settings: NodeSettings, command: list[str]) -> str:
    """What `zk0 node --check` prints: the command line, then the node config one key per line."""
    lines = ["supernode command:", f"  {shlex.join(command)}", "node config:"]
    lines += [f"  {key} = {value!r}" for key, value in settings.node_config().items()]
    return "\n".join(lines)


# Where a SuperNode's learning worker listens unless told: beside the policy store, like the frame cache.
LEARN_WORKER_SOCKET = "learn-worker.sock"
WORKER_READY_S = 300.0  # the worker imports torch and lerobot before it answers; slow on a loaded small host
MAX_IPC_PATH = 100  # Linux limits a unix socket's path to 107 bytes


def default_worker_address(settings: NodeSettings) -> str:
    path = settings.policy_store.resolve().parent / LEARN_WORKER_SOCKET
    if len(str(path)) > MAX_IPC_PATH:
        raise ConfigError(f"learning worker socket path {path} is too long for a unix socket; give --learn-worker ADDRESS")
    return f"ipc://{path}"


def with_learn_worker(settings: NodeSettings, address: str) -> NodeSettings:
    """`settings` whose ClientApps relay their work to the learning worker at `address`."""
    return dataclasses.replace(settings, extra_node_config={**settings.extra_node_config, "learn-worker": address})


def spawn_learn_worker(settings: NodeSettings, address: str, log_path: Path) -> ManagedProcess:
    """Start the learning worker for `settings`' node at `address`, serving only its datasets and policy store
    (`zk0 node --learn-worker`, `zk0 fleet local --learn-workers` and the agent start it through here); it
    answers once it has imported torch and lerobot: `wait_for_learn_worker`."""
    from zk0.agent.learning_worker import worker_command

    return ManagedProcess("learn-worker", worker_command(address, settings.datasets, settings.policy_store), log_path)


def wait_for_learn_worker(worker: ManagedProcess, address: str, timeout_s: float = WORKER_READY_S) -> None:
    """Return once the worker answers; stop it and raise LaunchError if it exits or stays silent."""
    from zk0.agent.learning_worker import wait_until_ready

    if not wait_until_ready(address, timeout_s, alive=worker.running):
        worker.stop()
        raise LaunchError(f"the learning worker at {address} did not start; see {worker.log_path}")


def supervise(children: list[ManagedProcess], stop: threading.Event, poll_s: float = 0.5) -> int:
    """Wait until `stop` is set (0) or a child exits (1); then stop every child, the last started first."""
    code = 0
    try:
        while not stop.wait(poll_s):
            exited = [child for child in children if not child.running()]
            if exited:
                print(f"zk0 node: {exited[0].name} exited with {exited[0].process.returncode}; stopping "
                      f"(see {exited[0].log_path})", file=sys.stderr)
                code = 1
                break
    finally:
        for child in reversed(children):
            child.stop()
    return code


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=Path("configs/agent.yaml"), help="agent YAML config")
    parser.add_argument("--check", action="store_true",
                        help="print the supernode command and node config this config gives, and exit")
    parser.add_argument("--learn-worker", nargs="?", const="", default=None, metavar="ADDRESS",
                        help="start a warm learning worker beside the SuperNode (model built once per run, not per "
                             "message); ADDRESS defaults to ipc://<policy store's folder>/learn-worker.sock")


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_node_settings(args.config)
        address = None if args.learn_worker is None else args.learn_worker or default_worker_address(settings)
        if address is not None:
            settings = with_learn_worker(settings, address)
        command = supernode_command(settings)
    except (ConfigError, LaunchError) as err:
        print(f"zk0 node: {err}", file=sys.stderr)
        return 2
    if args.check:
        print(describe(settings, command))
        return 0
    if address is None:
        # Replace this process: systemd (or the user's shell) then supervises flower-supernode directly.
        os.execve(command[0], command, flower_env())
    logs = settings.policy_store.resolve().parent / "logs"
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    worker = spawn_learn_worker(settings, address, logs / "learn-worker.log")
    try:
        wait_for_learn_worker(worker, address)
    except LaunchError as err:
        print(f"zk0 node: {err}", file=sys.stderr)
        return 1
    supernode = ManagedProcess("flower-supernode", command, logs / "supernode.log")
    print(f"zk0 node: learning worker at {address}, flower-supernode running; logs in {logs}", flush=True)
    return supervise([worker, supernode], stop)
