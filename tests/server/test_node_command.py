"""`zk0 node` builds the flower-supernode command from the agent config's `federation:` section, parsed with
the agent config's typed-YAML rules (one line naming the key) and without opening any device."""

import subprocess
import sys
from pathlib import Path

import pytest

from zk0.agent.node import describe, format_node_config, load_node_settings, supernode_command
from zk0.common.typed_yaml import ConfigError
from zk0.server.launch import superlink_command, SuperLinkSpec
from zk0.server.certs import CertPaths

REPO = Path(__file__).resolve().parents[2]

# The arms' serial ports do not exist here: `zk0 node` must not need them.
HOST_YAML = """
host_id: h1
robot_type: so101
follower: {port: /dev/ttyNOPE0, id: f, calibration_dir: /nonexistent}
leader: {port: /dev/ttyNOPE1, id: l, calibration_dir: /nonexistent}
datasets_root: /data
"""
AGENT_YAML = HOST_YAML + """
federation:
  superlink: "fl.example.org:9093"
  root_certificates: /etc/zk0/ca.crt
  auth_private_key: /etc/zk0/node.key
  datasets: [pick, /abs/push]
  policy_store: /var/lib/zk0/policies
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    return path


def test_supernode_command_has_tls_auth_and_node_config(tmp_path):
    command = supernode_command(load_node_settings(_write(tmp_path, AGENT_YAML)))
    assert command[0].endswith("flower-supernode")
    joined = " ".join(command)
    assert "--superlink fl.example.org:9093" in joined
    assert "--root-certificates /etc/zk0/ca.crt" in joined
    assert "--auth-supernode-private-key /etc/zk0/node.key" in joined
    assert "--insecure" not in command
    assert "--allow-runtime-dependency-installation" not in command  # Flower's default: no runtime installs
    node_config = command[command.index("--node-config") + 1]
    assert 'dataset-roots="/data/pick,/abs/push"' in node_config
    assert 'policy-store="/var/lib/zk0/policies"' in node_config
    assert 'node-name="h1"' in node_config  # named after the host by default
    assert "policy-keep=20" in node_config and "policy-max-bytes" not in node_config  # the store's default limits


def test_typed_settings_node_name_and_insecure(tmp_path):
    settings = load_node_settings(_write(tmp_path, HOST_YAML + (
        "federation: {superlink: 'h:1', datasets: [a], insecure: true, node_name: arm-7, runtime_port: 9094,"
        " keep_versions: null, max_policy_store: 1.5G}\n")))
    assert settings.insecure is True and settings.runtime_port == 9094 and settings.datasets == [Path("/data/a")]
    node_config = settings.node_config()
    assert node_config["node-name"] == "arm-7"
    assert "policy-keep" not in node_config and node_config["policy-max-bytes"] == int(1.5 * 2**30)
    command = supernode_command(settings)
    assert "--insecure" in command and "--root-certificates" not in command
    assert command[command.index("--port") + 1] == "9094"


@pytest.mark.parametrize(
    ("federation", "message"),
    [
        ("", "federation: section missing"),
        ("federation: {datasets: [a]}\n", "federation.superlink: missing required key"),
        ("federation: {superlink: 'h:1', datasets: []}\n", "federation.datasets: a non-empty list"),
        ("federation: {superlink: 'h:1', datasets: [a], tls: no}\n", "federation.tls: unknown key"),
        ("federation: {superlink: 'h:1', datasets: [a], insecure: 'false'}\n",
         "federation.insecure: expected bool, got str 'false'"),
        ("federation: {superlink: 'h:1', datasets: [a], insecure: true, runtime_port: '9094'}\n",
         "federation.runtime_port: expected int, got str '9094'"),
        ("federation: {superlink: 'h:1', datasets: [a]}\n",
         "federation.root_certificates: required unless insecure is true"),
    ],
)
def test_bad_federation_section_is_one_line(tmp_path, federation, message):
    path = _write(tmp_path, HOST_YAML + federation)
    with pytest.raises(ConfigError) as info:
        load_node_settings(path)
    assert str(info.value).startswith(f"{path}: {message}")
    assert "\n" not in str(info.value)


def test_check_prints_the_effective_settings_or_the_mistake(tmp_path):
    def check(text: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "zk0.cli", "node", "--config", str(_write(tmp_path, text)),
                               "--check"], capture_output=True, text=True, timeout=120, cwd=REPO)

    good = check(AGENT_YAML)
    assert good.returncode == 0, good.stderr
    settings = load_node_settings(tmp_path / "agent.yaml")
    assert good.stdout.strip() == describe(settings, supernode_command(settings))
    assert "--root-certificates /etc/zk0/ca.crt" in good.stdout and "node-name = 'h1'" in good.stdout

    bad = check(AGENT_YAML + "  insecure: 'false'\n")  # a string, not a bool: must not turn TLS off
    assert bad.returncode != 0 and bad.stdout == ""
    assert bad.stderr.strip() == f"zk0 node: {tmp_path / 'agent.yaml'}: federation.insecure: expected bool, got str 'false'"


def test_superlink_command_is_tls_with_node_auth_by_default(tmp_path):
    command = superlink_command(SuperLinkSpec(port=9093, certs=CertPaths(tmp_path)))
    assert "--insecure" not in command
    assert "--enable-supernode-auth" in command and "--disable-runtime-dependency-installation" in command
    assert command[command.index("--ssl-certfile") + 1] == str(tmp_path / "server.crt")
    assert "--insecure" in superlink_command(SuperLinkSpec(certs=None))


def test_node_config_syntax():
    assert format_node_config({"a": "x y", "b": 2, "c": True, "d": 0.5}) == 'a="x y" b=2 c=true d=0.5'
