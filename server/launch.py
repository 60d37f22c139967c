"""`zk0 server`: run a Flower SuperLink and submit the zk0 federation to it.

The pieces are Flower 1.41's own deployment engine, driven through its command-line tools:

- `flower-superlink` serves the Fleet, Control and Runtime APIs on one HTTPS port, with SuperNode
  authentication on and runtime dependency installation off (the host is already installed);
- `flwr supernode register` admits each node's public key (see `zk0 certs`);
- `flwr run` submits a Flower App directory whose pyproject names `zk0.server.server_app:app` and
  `zk0.agent.client_app:app`. Since zk0 is installed on the server and on every host, the app
  directory carries no code: it is generated, holding only that pyproject and the run config.

The flwr CLI reads its SuperLink connection from `$FLWR_HOME/config.toml`; each launcher gets a
private FLWR_HOME so several federations (tests, a user's own runs) never share one.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from zk0.common.flower_process import LaunchError, ManagedProcess, flower_env, flower_tool, wait_for_port
from zk0.server.certs import CertPaths

ZK0_COMPONENTS = {"serverapp": "zk0.server.server_app:app", "clientapp": "zk0.agent.client_app:app"}
RunConfigValue = bool | int | float | str


@dataclass(frozen=True)
class SuperLinkSpec:
    host: str = "127.0.0.1"
    port: int = 9093
    certs: CertPaths | None = None  # None: insecure, only with an explicit user choice
    database: Path | None = None  # None: in memory; a file lets a restarted SuperLink keep its nodes
    node_auth: bool = True

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def local_address(self) -> str:
        """Where commands on this machine reach it: loopback when it listens on every interface."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"{host}:{self.port}"


def superlink_command(spec: SuperLinkSpec) -> list[str]:
    command = [flower_tool("flower-superlink"), "--host", spec.host, "--port", str(spec.port),
               "--disable-runtime-dependency-installation"]
    if spec.certs is None:
        command.append("--insecure")
    else:
        command += ["--ssl-ca-certfile", str(spec.certs.ca_cert), "--ssl-certfile", str(spec.certs.server_cert),
                    "--ssl-keyfile", str(spec.certs.server_key)]
    if spec.node_auth:
        command.append("--enable-supernode-auth")
    if spec.database is not None:
        command += ["--database", str(spec.database)]
    return command


def start_superlink(spec: SuperLinkSpec, log_path: Path, timeout_s: float = 60.0) -> ManagedProcess:
    process = ManagedProcess("superlink", superlink_command(spec), log_path)
    try:
        wait_for_port(spec.local_address.rsplit(":", 1)[0], spec.port, timeout_s)
    except LaunchError:
        process.stop()
        raise LaunchError(f"flower-superlink did not start on {spec.address}; see {log_path}") from None
    return process


def _toml_value(value: RunConfigValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string literal is a valid TOML basic string


class FlowerCli:
    """The `flwr` command line, bound to one SuperLink through a private FLWR_HOME."""

    def __init__(self, flwr_home: Path, spec: SuperLinkSpec):
        self.spec = spec
        self.env = flower_env({"FLWR_HOME": str(flwr_home)})
        flwr_home.mkdir(parents=True, exist_ok=True)
        lines = ['[superlink]', 'default = "zk0"', "", "[superlink.zk0]", f'address = "{spec.local_address}"']
        if spec.certs is None:
            lines.append("insecure = true")
        else:
            lines.append(f"root-certificates = {_toml_value(str(spec.certs.ca_cert.resolve()))}")
        (flwr_home / "config.toml").write_text("\n".join(lines) + "\n")

    def _json(self, *args: str, timeout_s: float = 120.0) -> dict:
        result = subprocess.run([flower_tool("flwr"), *args, "--format", "json"], env=self.env,
                                capture_output=True, text=True, timeout=timeout_s)
        try:
            answer = json.loads(result.stdout)
        except json.JSONDecodeError:
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise LaunchError(f"flwr {args[0]} failed: {detail[-1] if detail else 'no output'}") from None
        if not answer.get("success", False):
            raise LaunchError(f"flwr {args[0]} failed: {answer.get('error-message', answer)}")
        return answer

    def register_node(self, public_key: Path, name: str | None = None) -> int:
        extra = ["--name", name] if name else []
        return int(self._json("supernode", "register", str(public_key), *extra)["node-id"])

    def node_statuses(self) -> dict[int, str]:
        """Each registered SuperNode's status ('registered', 'online', 'offline', ...) by node id."""
        return {int(n["node-id"]): str(n["status"]) for n in self._json("supernode", "ls")["nodes"]}

    def start_run(self, app_dir: Path) -> int:
        return int(self._json("run", str(app_dir))["run-id"])

    def run_status(self, run_id: int) -> str:
        """'pending', 'starting', 'running' or 'finished:completed|failed|stopped'."""
        runs = self._json("ls", "--run-id", str(run_id))["runs"]
        return str(runs[0]["status"])

    def stop_run(self, run_id: int) -> None:
        self._json("stop", str(run_id))


def write_app_dir(
    app_dir: Path, run_config: Mapping[str, RunConfigValue], components: Mapping[str, str] = ZK0_COMPONENTS
) -> Path:
    """Write the Flower App directory (a pyproject only) that `flwr run` submits."""
    app_dir.mkdir(parents=True, exist_ok=True)
    config_lines = [f"{key} = {_toml_value(value)}" for key, value in run_config.items()]
    component_lines = [f'{kind} = "{ref}"' for kind, ref in components.items()]
    (app_dir / "pyproject.toml").write_text("\n".join([
        "[build-system]", 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', "",
        "[project]", 'name = "zk0-federation"', 'version = "1.0.0"',
        'description = "zk0 federated SmolVLA training (code installed on every host)"',
        'license = "Apache-2.0"', "dependencies = []", "",
        "[tool.flwr.app]", 'publisher = "zk0"', "",
        "[tool.flwr.app.components]", *component_lines, "",
        "[tool.flwr.app.config]", *config_lines, "",
    ]))
    return app_dir


def wait_for_run(cli: FlowerCli, run_id: int, timeout_s: float, on_poll=None, poll_s: float = 5.0) -> str:
    """Block until the run finishes; returns its final status. `on_poll()` runs between polls."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = cli.run_status(run_id)
        if on_poll is not None:
            on_poll()
        if status.startswith("finished"):
            return status
        time.sleep(poll_s)
    raise LaunchError(f"run {run_id} did not finish within {timeout_s:.0f} s")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=Path("configs/server.yaml"), help="server YAML config")
    parser.add_argument("--certs", type=Path, default=None, help="directory from `zk0 certs` (overrides the config)")
    parser.add_argument("--insecure", action="store_true",
                        help="serve without TLS (traffic and models in clear text; for isolated test networks only)")
    parser.add_argument("--register", action="append", type=Path, default=[],
                        help="register a SuperNode public key before the run; repeat")


def run(args: argparse.Namespace) -> int:
    from zk0.server.config import ConfigError, load_server_config

    try:
        config = load_server_config(args.config)
    except ConfigError as err:
        print(f"zk0 server: {err}")
        return 2
    deploy = config.deployment
    certs = None if args.insecure else CertPaths(args.certs or deploy.certs_dir)
    if certs is not None and not certs.server_cert.exists():
        print(f"zk0 server: no server certificate in {certs.root}: run `zk0 certs --out {certs.root}` "
              "or pass --insecure for an isolated test network")
        return 2
    run_dir = config.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = SuperLinkSpec(host=deploy.host, port=deploy.port, certs=certs, database=run_dir / "superlink.db")
    superlink = start_superlink(spec, run_dir / "logs" / "superlink.log")
    try:
        cli = FlowerCli(run_dir / "flwr-home", spec)
        for key in args.register:
            print(f"registered node {cli.register_node(key)} ({key})")
        app_dir = write_app_dir(run_dir / "app", config.run_config(args.config.resolve()))
        run_id = cli.start_run(app_dir)
        print(f"run {run_id} submitted to {spec.address}; metrics in {run_dir / 'federated_metrics.json'}")
        status = wait_for_run(cli, run_id, timeout_s=deploy.run_timeout_s)
        print(f"run {run_id}: {status}")
        return 0 if status == "finished:completed" else 1
    except LaunchError as err:
        print(f"zk0 server: {err}")
        return 1
    finally:
        superlink.stop()
