"""`zk0 node` builds the flower-supernode command from the agent config's `federation:` section."""

import pytest

from zk0.agent.node import NodeConfigError, format_node_config, load_node_settings, supernode_command
from zk0.server.launch import superlink_command, SuperLinkSpec
from zk0.server.certs import CertPaths

AGENT_YAML = """
host_id: h1
datasets_root: /data
federation:
  superlink: "fl.example.org:9093"
  root_certificates: /etc/zk0/ca.crt
  auth_private_key: /etc/zk0/node.key
  datasets: [pick, /abs/push]
  policy_store: /var/lib/zk0/policies
"""


def test_supernode_command_has_tls_auth_and_node_config(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text(AGENT_YAML)
    command = supernode_command(load_node_settings(path))
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


def test_superlink_command_is_tls_with_node_auth_by_default(tmp_path):
    command = superlink_command(SuperLinkSpec(port=9093, certs=CertPaths(tmp_path)))
    assert "--insecure" not in command
    assert "--enable-supernode-auth" in command and "--disable-runtime-dependency-installation" in command
    assert command[command.index("--ssl-certfile") + 1] == str(tmp_path / "server.crt")
    assert "--insecure" in superlink_command(SuperLinkSpec(certs=None))


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("host_id: h\n", "federation: section missing"),
        ("federation: {datasets: [a]}\n", "federation.superlink: required"),
        ("federation: {superlink: 'h:1', datasets: []}\n", "federation.datasets"),
        ("federation: {superlink: 'h:1', datasets: [a], tls: no}\n", "federation.tls: unknown key"),
    ],
)
def test_bad_federation_section_is_one_line(tmp_path, yaml_text, message):
    path = tmp_path / "agent.yaml"
    path.write_text(yaml_text)
    with pytest.raises(NodeConfigError, match=message):
        load_node_settings(path)


def test_missing_root_certificate_without_insecure(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text("federation: {superlink: 'h:1', datasets: [a]}\n")
    with pytest.raises(NodeConfigError, match="root_certificates: required"):
        supernode_command(load_node_settings(path))


def test_node_config_syntax():
    assert format_node_config({"a": "x y", "b": 2, "c": True, "d": 0.5}) == 'a="x y" b=2 c=true d=0.5'
