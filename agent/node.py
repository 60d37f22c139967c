"""`zk0 node`: run this host's Flower SuperNode.

Reads the `federation:` section of the agent config (plus `datasets_root`):

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

The SuperNode runs with TLS and SuperNode authentication; Flower 1.41 SuperNodes never install
app dependencies at run time unless `--allow-runtime-dependency-installation` is given, which zk0
never passes: the host environment is installed once, by the package manager.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from zk0.common.flower_process import flower_env, flower_tool


class NodeConfigError(ValueError):
    """One line naming the key at fault."""


@dataclass(frozen=True)
class NodeSettings:
    superlink: str
    datasets: list[Path]
    policy_store: Path
    root_certificates: Path | None = None
    auth_private_key: Path | None = None
    agent_address: str = ""
    device: str = "cpu"
    insecure: bool = False
    runtime_port: int | None = None
    extra_node_config: dict[str, str | int | float | bool] = field(default_factory=dict)

    def node_config(self) -> dict[str, str | int | float | bool]:
        """What the ClientApp reads from `context.node_config`."""
        return {
            "dataset-roots": ",".join(str(p) for p in self.datasets),
            "policy-store": str(self.policy_store),
            "agent-address": self.agent_address,
            "device": self.device,
            **self.extra_node_config,
        }


def format_node_config(values: Mapping[str, str | int | float | bool]) -> str:
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
    runtime_port = runtime_port if runtime_port is not None else settings.runtime_port
    command = [flower_tool("flower-supernode"), "--superlink", settings.superlink,
               "--node-config", format_node_config(settings.node_config())]
    if settings.insecure:
        command.append("--insecure")
    else:
        if settings.root_certificates is None:
            raise NodeConfigError("federation.root_certificates: required unless federation.insecure is true")
        command += ["--root-certificates", str(settings.root_certificates)]
    if settings.auth_private_key is not None:
        command += ["--auth-supernode-private-key", str(settings.auth_private_key)]
    if runtime_port is not None:
        # Each SuperNode serves a local Runtime API to its ClientApp processes; several on one machine need distinct ports.
        command += ["--port", str(runtime_port)]
    return command


def load_node_settings(path: Path) -> NodeSettings:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise NodeConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError:
        raise NodeConfigError(f"{path}: not valid YAML") from None
    federation = raw.get("federation")
    if not isinstance(federation, dict):
        raise NodeConfigError(f"{path}: federation: section missing (superlink address, certificates, datasets)")
    known = {"superlink", "root_certificates", "auth_private_key", "datasets", "policy_store", "agent_address",
             "device", "insecure", "runtime_port"}
    unknown = sorted(set(federation) - known)
    if unknown:
        raise NodeConfigError(f"{path}: federation.{unknown[0]}: unknown key (known: {', '.join(sorted(known))})")
    if not isinstance(federation.get("superlink"), str):
        raise NodeConfigError(f"{path}: federation.superlink: required, as host:port")
    datasets_root = Path(raw.get("datasets_root", "/var/lib/zk0/datasets"))
    names = federation.get("datasets") or []
    if not isinstance(names, list) or not names:
        raise NodeConfigError(f"{path}: federation.datasets: a non-empty list of dataset names or roots")
    optional_path = lambda key: Path(federation[key]) if federation.get(key) else None  # noqa: E731
    return NodeSettings(
        superlink=federation["superlink"],
        datasets=[datasets_root / str(n) if not os.path.isabs(str(n)) else Path(n) for n in names],
        policy_store=Path(federation.get("policy_store", "/var/lib/zk0/policies")),
        root_certificates=optional_path("root_certificates"),
        auth_private_key=optional_path("auth_private_key"),
        agent_address=str(federation.get("agent_address", "")),
        device=str(federation.get("device", "cpu")),
        insecure=bool(federation.get("insecure", False)),
        runtime_port=int(federation["runtime_port"]) if federation.get("runtime_port") else None,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=Path("configs/agent.yaml"), help="agent YAML config")


def run(args: argparse.Namespace) -> int:
    try:
        command = supernode_command(load_node_settings(args.config))
    except NodeConfigError as err:
        print(f"zk0 node: {err}")
        return 2
    # Replace this process: systemd (or the user's shell) then supervises flower-supernode directly.
    os.execve(command[0], command, flower_env())
    return 0  # not reached
